"""The conformance kit: language-neutral test vectors for docs/protocol.md sections 1-4.

`python -m conformance.generate` writes the JSON files of this directory from the real
code (licd_client's framing, schemas and verifier; licd's token signer), with fixed keys
and instants, so the output is byte-identical on every run. Nothing here is installed
or imported by licd; tests/unit/test_conformance.py replays the files.
"""
