"""licd's dependencies: the one part of its metadata that pyproject.toml cannot state.

licd requires licd-client of exactly its own version: both wheels are built from this
tree and the daemon imports the client's wire code, so a licd must never meet another
release's client. The version is written once, as licd_client.__version__, and read
here by the same function that reads pyproject.toml's dynamic version.
"""

from setuptools import setup
from setuptools.config.expand import read_attr

setup(
    install_requires=[
        f"licd-client=={read_attr('licd_client.__version__')}",
        "aiosqlite>=0.20",
        "click>=8.1",
        "prometheus-client>=0.20",
    ]
)
