"""licd.config.settings: the example file, the defaults, and one test per kind of error."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from licd.config.settings import (
    AdminConfig,
    AlertsConfig,
    AuditConfig,
    Config,
    ConfigError,
    MetricsConfig,
    ServerConfig,
    StoreConfig,
    default_config,
    default_state_dir,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)
from licd.engine import Licence

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"

LICENCE = """
[[licence]]
key = "K-1"
id = "one"
product = "p"
seats = 1
"""

SEATS_RANGE = "licence[0].seats: must be an integer between 1 and 1000000"


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "licd.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def error(tmp_path: Path, text: str) -> str:
    """The ConfigError message for `text`, checked to start with the file's name."""
    path = tmp_path / "licd.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# --- the example file and the defaults --------------------------------------------------


def test_example_file_loads_with_expected_values() -> None:
    config = load_config(EXAMPLE)
    assert config.source == EXAMPLE
    server = config.server
    assert server.listen == (("127.0.0.1", 27500), ("::1", 27500))
    assert server.state_dir == Path("/var/lib/licd")
    assert server.site == "hq"
    assert (server.max_connections, server.max_connections_per_peer) == (4096, 256)
    assert server.idle_timeout == 120.0
    assert (server.hello_timeout, server.frame_timeout, server.write_timeout) == (2, 5, 10)
    assert (server.max_frame, server.max_pipeline) == (16384, 8)
    assert (server.shutdown_timeout, server.reap_interval, server.log_level) == (10, 1, "info")
    dicom, builder, cad = config.licences
    assert config.groups == {"cad": ("user:alice", "user:bob", "host:ws-7", "ip:10.1.0.0/16")}
    assert (cad.count_by, cad.overdraft, cad.allow, cad.deny) == (
        "host",
        2,
        ("group:cad", "host:lab-*"),
        ("user:guest",),
    )
    assert (dict(cad.reserve), dict(cad.max)) == ({"cad": 3}, {"user": 1, "group:cad": 6})
    (scans,) = cad.counter
    assert (scans.name, scans.limit, scans.reset, scans.dedup_window) == (
        "scans",
        100000,
        "monthly",
        3.0,
    )
    (addon,) = cad.addon
    assert (addon.seats, addon.features) == (5, {"render": "on"})
    assert addon.starts == epoch("2026-12-01T00:00:00+00:00")
    assert dicom == Licence(
        key="XXXX-YYYY-ZZZZ",
        id="dicom-hq",
        product="dicom",
        seats=3,
        lease_ttl=90.0,
        grace=15.0,
        not_before=epoch("2026-01-01T00:00:00+00:00"),
        expires=epoch("2027-01-01T00:00:00+00:00"),
        features={"tier": "pro", "modules": "core,ocr"},
        max_ttl=2 * 86400.0,
        delegable=True,
    )
    assert (builder.id, builder.seats, builder.lease_ttl, builder.grace) == (
        "builder",
        20,
        3600.0,
        300.0,
    )
    assert builder.not_before is None and builder.expires is None
    assert builder.features == {"max_jobs": 16, "debug_symbols": True}


def test_example_file_documents_every_key() -> None:
    doc = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    server_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    commented = {"tls_cert", "tls_key"}  # shown commented out: paths to files of one's own
    assert set(doc["server"]) | commented == server_fields
    text = EXAMPLE.read_text(encoding="utf-8")
    assert all(f"# {name} = " in text for name in commented)
    licence_fields = {f.name for f in dataclasses.fields(Licence)}
    documented = set(doc["licence"][0]) | set(doc["licence"][2]) | {"device_period"}
    assert documented == licence_fields  # device_period: shown commented out
    store = {f.name for f in dataclasses.fields(StoreConfig)}
    assert all(f"# {name} = " in text for name in store)  # [store]: shown commented out
    audit_fields = {f.name for f in dataclasses.fields(AuditConfig)}
    assert set(doc["audit"]) | {"export_dir"} == audit_fields
    assert "# export_dir = " in text


def test_example_server_values_other_than_listen_are_the_defaults() -> None:
    server = load_config(EXAMPLE).server
    defaults = default_config().server
    skip = {"listen", "state_dir", "site"}
    for f in dataclasses.fields(ServerConfig):
        if f.name not in skip:
            assert getattr(server, f.name) == getattr(defaults, f.name), f.name


def test_default_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setattr("socket.gethostname", lambda: "box1")
    config = default_config()
    assert config.source is None
    assert config.server == ServerConfig(
        listen=(("127.0.0.1", 27500),), state_dir=tmp_path / "licd", site="box1"
    )
    assert config.licences == (
        Licence(
            key="DEMO-0000-0000",
            id="demo",
            product="demo",
            seats=3,
            lease_ttl=90.0,
            grace=15.0,
            features={"tier": "demo"},
        ),
    )


def test_empty_file_gives_default_server_and_no_licences(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr("socket.gethostname", lambda: "box2")
    config = load(tmp_path, "[server]\n")
    assert config.licences == ()
    assert config.server == ServerConfig(
        listen=(("127.0.0.1", 27500),), state_dir=tmp_path / "state" / "licd", site="box2"
    )
    assert load(tmp_path, "").server == config.server


def test_site_falls_back_when_the_host_has_no_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "")
    assert default_config().server.site == "licd"
    monkeypatch.setattr("socket.gethostname", lambda: "h" * 100)
    assert default_config().server.site == "h" * 64


def test_licence_defaults_and_optional_keys(tmp_path: Path) -> None:
    (licence,) = load(tmp_path, LICENCE).licences
    assert licence == Licence(key="K-1", id="one", product="p", seats=1)
    assert (licence.lease_ttl, licence.grace, licence.features) == (90.0, 15.0, {})


def test_config_is_frozen() -> None:
    config = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.site = "x"  # type: ignore[misc]


def test_loading_creates_no_directory(tmp_path: Path) -> None:
    state = tmp_path / "not" / "there"
    config = load(tmp_path, f'[server]\nstate_dir = "{state}"\n')
    assert config.server.state_dir == state
    assert not (tmp_path / "not").exists()


def test_state_dir_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load(tmp_path, '[server]\nstate_dir = "~/licd-state"\n')
    assert config.server.state_dir == tmp_path / "licd-state"


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^/etc/licd\.toml: server\.site: "):
        parse_config('[server]\nsite = ""\n', Path("/etc/licd.toml"))
    assert parse_config("", Path("x.toml")).source == Path("x.toml")


# --- validity windows and datetimes --------------------------------------------------------


def test_offset_datetimes_become_epoch_seconds(tmp_path: Path) -> None:
    text = LICENCE + "not_before = 2026-03-01T12:00:00+01:00\nexpires = 2026-03-02T00:00:00Z\n"
    (licence,) = load(tmp_path, text).licences
    assert licence.not_before == datetime(2026, 3, 1, 11, tzinfo=UTC).timestamp()
    assert licence.expires == datetime(2026, 3, 2, tzinfo=UTC).timestamp()


def test_licence_outside_its_window_still_loads(tmp_path: Path) -> None:
    text = LICENCE + "not_before = 1990-01-01T00:00:00Z\nexpires = 1991-01-01T00:00:00Z\n"
    (licence,) = load(tmp_path, text).licences
    assert licence.validity_error(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) == (
        "licence_expired"
    )


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("2026-01-01T00:00:00", "add an offset like Z"),
        ("2026-01-01", "offset like Z"),
        ("12:00:00", "offset"),
        ('"2026-01-01T00:00:00Z"', "unquoted"),
        ("1767225600", "unquoted date-time"),
    ],
)
def test_datetime_without_offset_is_an_error(tmp_path: Path, value: str, hint: str) -> None:
    message = error(tmp_path, LICENCE + f"not_before = {value}\n")
    assert "licence[0].not_before: " in message
    assert hint in message


def test_times_outside_the_years_1_to_9999_utc_are_refused(tmp_path: Path) -> None:
    late = LICENCE + "expires = 9999-12-31T23:59:59-05:00\n"
    early = LICENCE + "not_before = 0001-01-01T00:00:00+05:00\n"
    assert "licence[0].expires: must fall within the years 1 to 9999 in UTC" in error(
        tmp_path, late
    )
    assert "licence[0].not_before: must fall within the years 1 to 9999 in UTC" in error(
        tmp_path, early
    )
    edge = LICENCE + "expires = 9999-12-31T23:59:59Z\n"
    path = tmp_path / "edge.toml"
    path.write_text(edge)
    assert (
        load_config(path).licences[0].expires
        == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    )


def test_expires_must_be_after_not_before(tmp_path: Path) -> None:
    text = LICENCE + "not_before = 2027-01-01T00:00:00Z\nexpires = 2026-01-01T00:00:00Z\n"
    assert "licence[0].expires: must be after not_before" in error(tmp_path, text)
    same = LICENCE + "not_before = 2027-01-01T00:00:00Z\nexpires = 2027-01-01T01:00:00+01:00\n"
    assert "licence[0].expires: must be after not_before" in error(tmp_path, same)


# --- errors name the file and the key -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys and tables
        (
            '[server]\nlistne = ["127.0.0.1:1"]\n',
            "server.listne: unknown key (did you mean 'listen'?)",
        ),
        (LICENCE + "seat = 2\n", "licence[0].seat: unknown key (did you mean 'seats'?)"),
        ("[upstraem]\nhost = 'x'\n", "upstraem: unknown key (did you mean 'upstream'?)"),
        ("licenses = []\n", "licenses: unknown key"),
        ('[server]\n"odd key" = 1\n', 'server."odd key": unknown key'),
        # wrong shapes
        ("server = 1\n", "server: must be a table"),
        ("[licence]\nkey = 'k'\n", "licence: must be an array of tables"),
        # wrong types
        (
            LICENCE.replace("seats = 1", "seats = true"),
            SEATS_RANGE,
        ),
        (
            LICENCE.replace("seats = 1", "seats = 1.0"),
            SEATS_RANGE,
        ),
        (
            LICENCE.replace("seats = 1", 'seats = "1"'),
            SEATS_RANGE,
        ),
        (LICENCE.replace('id = "one"', "id = 1"), "licence[0].id: must be 1 to 64 characters"),
        ("[server]\nmax_connections = '10'\n", "server.max_connections: must be an integer >= 1"),
        ("[server]\nidle_timeout = true\n", "server.idle_timeout: must be a number of seconds"),
        ("[server]\nlisten = '127.0.0.1:1'\n", "server.listen: must be a non-empty array"),
        ("[server]\nlisten = [27500]\n", 'server.listen[0]: must be a "host:port" string'),
        ("[server]\nstate_dir = 5\n", "server.state_dir: must be a non-empty path string"),
        ("[server]\nsite = 5\n", "server.site: must be a non-empty string"),
        (LICENCE + "features = 'pro'\n", "licence[0].features: must be a table"),
        (LICENCE + "features = { a = [1] }\n", "licence[0].features.a: must be a string, integer"),
        (LICENCE + "features = { a = { b = 1 } }\n", "licence[0].features.a: must be a string"),
        (LICENCE + "features = { a = 2026-01-01 }\n", "licence[0].features.a: must be a string"),
        # missing required keys
        (LICENCE.replace("seats = 1\n", ""), "licence[0].seats: required key is missing"),
        (LICENCE.replace('key = "K-1"\n', ""), "licence[0].key: required key is missing"),
        (LICENCE.replace('product = "p"\n', ""), "licence[0].product: required key is missing"),
        # bad ranges
        (
            LICENCE.replace("seats = 1", "seats = 0"),
            SEATS_RANGE,
        ),
        (LICENCE + "lease_ttl = 0.5\n", "licence[0].lease_ttl: must be at least 1 s"),
        (LICENCE + "lease_ttl = 0\n", "licence[0].lease_ttl: must be greater than 0"),
        (LICENCE + "grace = -1\n", "licence[0].grace: must not be negative"),
        (LICENCE + 'grace = "367d"\n', "licence[0].grace: must be at most 366 days"),
        (LICENCE + "lease_ttl = nan\n", "licence[0].lease_ttl: must be a finite duration"),
        ("[server]\nmax_connections = 0\n", "server.max_connections: must be an integer >= 1"),
        (
            "[server]\nmax_connections = 10\nmax_connections_per_peer = 11\n",
            "server.max_connections_per_peer: must not exceed max_connections",
        ),
        ("[server]\nmax_connections_per_peer = 0\n", "server.max_connections_per_peer: must be"),
        (
            "[server]\nmax_pipeline = 65\n",
            "server.max_pipeline: must be an integer between 1 and 64",
        ),
        (
            "[server]\nmax_pipeline = 0\n",
            "server.max_pipeline: must be an integer between 1 and 64",
        ),
        ("[server]\nmax_frame = 1023\n", "server.max_frame: must be an integer between 1024 and"),
        ("[server]\nmax_frame = 1048577\n", "server.max_frame: must be an integer between 1024"),
        ("[server]\nhello_timeout = 0\n", "server.hello_timeout: must be greater than 0"),
        ("[server]\nwrite_timeout = -3\n", "server.write_timeout: must be greater than 0"),
        ("[server]\nreap_interval = '0s'\n", "server.reap_interval: must be greater than 0"),
        ("[server]\nshutdown_timeout = inf\n", "server.shutdown_timeout: must be a finite"),
        ("[server]\nlog_level = 'verbose'\n", "server.log_level: must be one of debug, info"),
        ("[server]\nlog_level = 'INFO'\n", "server.log_level: must be one of"),
        (
            "[server]\nevent_loop = 'trio'\n",
            "server.event_loop: must be one of auto, asyncio, uvloop",
        ),
        ("[server]\nsite = ''\n", "server.site: must be a non-empty string of at most 64"),
        ("[server]\nsite = '" + "s" * 65 + "'\n", "server.site: must be a non-empty string"),
        ('[server]\nsite = "a\\tb"\n', "server.site: must not contain control characters"),
        ("[server]\nstate_dir = 'relative/dir'\n", "server.state_dir: must be an absolute path"),
        ("[server]\nlisten = []\n", "server.listen: must be a non-empty array"),
        (
            "[server]\nstate_dir = '~no-such-user-licd/x'\n",
            "server.state_dir: names a home directory that does not exist",
        ),
        # licence strings
        (LICENCE.replace('"K-1"', '""'), "licence[0].key: must be a non-empty string"),
        (LICENCE.replace('"K-1"', '"' + "k" * 256 + '"'), "licence[0].key: must be a non-empty"),
        (LICENCE.replace('"K-1"', '" K-1"'), "licence[0].key: must not start or end with white"),
        (LICENCE.replace('"one"', '"has space"'), "licence[0].id: must be 1 to 64 characters"),
        (LICENCE.replace('"one"', '"' + "i" * 65 + '"'), "licence[0].id: must be 1 to 64"),
        (LICENCE.replace('product = "p"', 'product = ""'), "licence[0].product: must be a non"),
        # features
        (LICENCE + 'features = { "" = 1 }\n', 'licence[0].features."": feature names must be'),
        (LICENCE + "features = { a = nan }\n", "licence[0].features.a: must be a finite number"),
        (
            LICENCE + "features = { a = '" + "x" * 2048 + "' }\n",
            "licence[0].features: too large: 2049 bytes",
        ),
        (
            LICENCE + "[licence.features]\n" + "".join(f"f{i} = {i}\n" for i in range(33)),
            "licence[0].features: at most 32 features",
        ),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error(tmp_path, text)


def test_error_in_a_later_licence_names_its_index(tmp_path: Path) -> None:
    second = LICENCE.replace('"K-1"', '"K-2"').replace('"one"', '"two"')
    text = LICENCE + second + LICENCE.replace('"K-1"', '"K-3"').replace('"one"', '"three"')
    assert len(load(tmp_path, text).licences) == 3
    bad = LICENCE + second.replace("seats = 1", "seats = -2")
    assert SEATS_RANGE.replace("[0]", "[1]") in error(tmp_path, bad)


def test_duplicate_licence_id(tmp_path: Path) -> None:
    text = LICENCE + LICENCE.replace('"K-1"', '"K-2"')
    assert "licence[1].id: duplicate: licence[0] has the same id" in error(tmp_path, text)


def test_duplicate_licence_key_is_reported_without_the_key(tmp_path: Path) -> None:
    text = LICENCE.replace('"K-1"', '"SECRET-KEY"')
    text += text.replace('"one"', '"two"')
    message = error(tmp_path, text)
    assert "licence[1].key: duplicate: licence[0] has the same key" in message
    assert "SECRET-KEY" not in message


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("5x", "invalid duration '5x'"),
        ("", "invalid duration ''"),
        ("1h30m", "invalid duration"),
        ("15 min", "invalid duration"),
        ("-5s", "invalid duration"),
        ("1e3", "invalid duration"),
    ],
)
def test_bad_duration_string(tmp_path: Path, value: str, hint: str) -> None:
    message = error(tmp_path, LICENCE + f'lease_ttl = "{value}"\n')
    assert f"licence[0].lease_ttl: {hint}" in message
    assert '"15m"' in message  # the message shows what is expected


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("127.0.0.1", 'expected "host:port"'),
        ("::1:27500", "put an IPv6 address in brackets"),
        ("[::1]27500", 'expected "[ipv6]:port"'),
        ("[::1:27500", 'expected "[ipv6]:port"'),
        ("[1.2.3.4]:1", "is not an IPv6 address"),
        (":27500", "the host is missing"),
        ("127.0.0.1:", "the port must be a number 0..65535"),
        ("127.0.0.1:65536", "the port must be a number 0..65535"),
        ("127.0.0.1:-1", "the port must be a number 0..65535"),
        ("127.0.0.1:http", "the port must be a number 0..65535"),
        ("300.1.1.1:1", "is not an IPv4 address or host name"),
        ("127.000.0.1:1", "is not an IPv4 address or host name"),
        ("bad_host:1", "is not an IPv4 address or host name"),
        ("-x.example:1", "is not an IPv4 address or host name"),
    ],
)
def test_bad_listen_address(tmp_path: Path, value: str, hint: str) -> None:
    message = error(tmp_path, f'[server]\nlisten = ["127.0.0.1:1", "{value}"]\n')
    assert f"server.listen[1]: invalid address {value!r}: " in message
    assert hint in message


@pytest.mark.parametrize("second", ["127.0.0.1:27500", "[::1]:9", "[0:0::1]:9", "LOCALHOST:9"])
def test_duplicate_listen_address(tmp_path: Path, second: str) -> None:
    first = {"127.0.0.1:27500": "127.0.0.1:27500", "LOCALHOST:9": "localhost:9"}.get(
        second, "[::1]:9"
    )
    message = error(tmp_path, f'[server]\nlisten = ["{first}", "{second}"]\n')
    assert "server.listen[1]: duplicate of listen[0]" in message


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    message = error(tmp_path, "[server]\nsite = 'hq'\nlisten = [\n  '127.0.0.1:1'\n  oops\n")
    assert "invalid TOML" in message
    assert "line 5" in message


def test_unreadable_or_binary_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=rf"^{missing}: cannot read: "):
        load_config(missing)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read: "):
        load_config(tmp_path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"site = '\xff'\n")
    with pytest.raises(ConfigError, match=rf"^{binary}: not UTF-8 text \(byte 8\)"):
        load_config(binary)


# --- listen addresses -----------------------------------------------------------------


def test_listen_ipv6_hostnames_and_port_zero(tmp_path: Path) -> None:
    listen = '["[::1]:27500", "[::]:0", "[FE80::1%eth0]:1", "Licd.Example.com.:2", "0.0.0.0:3"]'
    config = load(tmp_path, f"[server]\nlisten = {listen}\n")
    assert config.server.listen == (
        ("::1", 27500),
        ("::", 0),
        ("fe80::1%eth0", 1),
        ("licd.example.com.", 2),
        ("0.0.0.0", 3),
    )


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[0:0:0:0:0:0:0:1]:65535") == ("::1", 65535)
    assert parse_address("localhost:27500") == ("localhost", 27500)
    with pytest.raises(ValueError, match="brackets"):
        parse_address("::1")


# --- durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("1.5h", 5400.0),
        (".5m", 30.0),
        (" 15 m ", 900.0),
    ],
)
def test_parse_duration_units(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (True, "must be a number of seconds"),
        (None, "must be a number of seconds"),
        ([1], "must be a number of seconds"),
        (0, "must be greater than 0"),
        ("0s", "must be greater than 0"),
        (-1.0, "must be greater than 0"),
        (math.nan, "must be a finite duration"),
        (math.inf, "must be a finite duration"),
        ("9" * 400, "must be a finite duration"),
        ("5 hours", "invalid duration '5 hours'"),
        ("1M", "invalid duration"),
    ],
)
def test_parse_duration_rejects(value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=rf"^ttl: {problem}"):
        parse_duration(value, what="ttl")


def test_parse_duration_allow_zero() -> None:
    assert parse_duration(0, allow_zero=True) == 0.0
    assert parse_duration("0m", allow_zero=True) == 0.0
    with pytest.raises(ValueError, match="^duration: must not be negative"):
        parse_duration(-1, allow_zero=True)


def test_durations_in_the_file_accept_every_unit(tmp_path: Path) -> None:
    text = (
        "[server]\n"
        'idle_timeout = "15m"\nhello_timeout = "2s"\nframe_timeout = 1.5\n'
        'write_timeout = "1h"\nshutdown_timeout = "1d"\nreap_interval = "1w"\n'
        + LICENCE
        + 'lease_ttl = "2d"\ngrace = 0\n'
    )
    config = load(tmp_path, text)
    server = config.server
    assert (server.idle_timeout, server.hello_timeout, server.frame_timeout) == (900, 2, 1.5)
    assert (server.write_timeout, server.shutdown_timeout) == (3600, 86400)
    assert server.reap_interval == 604800
    (licence,) = config.licences
    assert (licence.lease_ttl, licence.grace) == (172800.0, 0.0)


# --- the state directory --------------------------------------------------------------


def test_xdg_state_home_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "licd"


@pytest.mark.parametrize("value", [None, "", "relative/state"])
def test_xdg_state_home_unset_empty_or_relative(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", value)
    assert default_state_dir() == tmp_path / ".local" / "state" / "licd"


def test_example_documents_admin_metrics_and_alerts() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    doc = tomllib.loads(text)
    # Shown commented out: they name a group and a file the machine must have.
    commented = {"admin": {"group"}, "metrics": set(), "alerts": {"hook"}}
    for table, cls in (
        ("admin", AdminConfig),
        ("metrics", MetricsConfig),
        ("alerts", AlertsConfig),
    ):
        assert set(doc[table]) | commented[table] == {f.name for f in dataclasses.fields(cls)}
    assert '# group = "licd-admin"' in text
    assert '# hook = ["/usr/local/bin/licd-alert"]' in text
    config = load_config(EXAMPLE)
    assert config.admin == AdminConfig(Path("/var/lib/licd/admin.sock"), None, (1000,))
    assert config.metrics.listen == ("127.0.0.1", 9750)
    assert config.alerts.expiry_days == (15, 10) and config.alerts.denial_window == 600
    assert config.alerts.hook == ()


def test_admin_socket_defaults_to_the_state_dir(tmp_path: Path) -> None:
    config = parse_config(f'[server]\nstate_dir = "{tmp_path}"\n', tmp_path / "c.toml")
    assert config.admin_socket == tmp_path / "admin.sock"
    assert config.metrics.listen is None
    assert config.alerts == AlertsConfig()


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[admin]\nsocket = "relative.sock"', "admin.socket"),
        ("[admin]\nallow_uids = [-1]", "admin.allow_uids"),
        ("[admin]\nsokcet = 1", "admin.sokcet"),
        ('[metrics]\nlisten = "nohost"', "metrics.listen"),
        ("[alerts]\nusage_percent = [0]", "alerts.usage_percent"),
        ('[alerts]\nhook = ["relative/cmd"]', "alerts.hook"),
        ('[alerts]\nhook = "/bin/true"', "alerts.hook"),
        ('[alerts]\ndenial_window = "soon"', "alerts.denial_window"),
    ],
)
def test_admin_metrics_alerts_errors_name_the_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)):
        parse_config(text, tmp_path / "c.toml")


def test_licence_from_mapping_validates_like_the_file() -> None:
    from licd.config.settings import licence_from_mapping

    lic = licence_from_mapping({"key": "K-1", "id": "x", "product": "p", "seats": 2}, "admin", {})
    assert (lic.id, lic.seats, lic.lease_ttl) == ("x", 2, 90.0)
    with pytest.raises(ConfigError, match="admin: licence.seats"):
        licence_from_mapping({"key": "K-1", "id": "x", "product": "p", "seats": 0}, "admin", {})


UPSTREAM = """
[upstream]
servers = ["vendor.example.net:27500", "[::1]:27501"]
trust = ["%s"]
""" % ("ab" * 32)


def test_relayed_licences_and_upstream(tmp_path: Path) -> None:
    text = (
        UPSTREAM
        + """
[[licence]]
key = "K-1"
id = "site-block"
mode = "block"
block_seats = 10
block_ttl = "35d"
renew_every = "24h"

[[licence]]
key = "K-2"
id = "site-fwd"
mode = "forward"
"""
    )
    config = parse_config(text, tmp_path / "c.toml")
    assert config.licences == ()
    assert config.upstream is not None
    assert config.upstream.servers == ("vendor.example.net:27500", "[::1]:27501")
    assert config.upstream.trust == (bytes.fromhex("ab" * 32),)
    block, fwd = config.relayed
    assert (block.mode, block.block_seats, block.block_ttl, block.renew_every) == (
        "block",
        10,
        35 * 86400.0,
        86400.0,
    )
    assert (fwd.mode, fwd.block_seats) == ("forward", None)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[[licence]]\nkey = "K"\nid = "x"\nmode = "block"\nblock_seats = 1', "upstream"),
        (UPSTREAM + '[[licence]]\nkey = "K"\nid = "x"\nmode = "relay"', "licence[0].mode"),
        (UPSTREAM + '[[licence]]\nkey = "K"\nid = "x"\nmode = "block"', "block_seats"),
        (
            UPSTREAM + '[[licence]]\nkey = "K"\nid = "x"\nmode = "forward"\nblock_seats = 2',
            "licence[0].block_seats",
        ),
        (
            UPSTREAM + '[[licence]]\nkey="K"\nid="x"\nmode="block"\nblock_seats=1\nseats=3',
            "licence[0].seats: unknown key",
        ),
        (
            UPSTREAM
            + '[[licence]]\nkey="K"\nid="x"\nmode="block"\nblock_seats=1\n'
            + 'block_ttl="1h"\nrenew_every="2h"',
            "licence[0].renew_every",
        ),
        ('[upstream]\nservers = []\ntrust = ["%s"]' % ("ab" * 32), "upstream.servers"),
        ('[upstream]\nservers = ["h:1"]\ntrust = ["nothex"]', "upstream.trust[0]"),
        (
            '[[licence]]\nkey="K"\nid="x"\nproduct="p"\nseats=1\nlease_ttl=90\nmax_ttl=10',
            "licence[0].max_ttl",
        ),
        ('[[licence]]\nkey="K"\nid="x"\nproduct="p"\nseats=1\ndelegable=1', "delegable"),
    ],
)
def test_upstream_errors_name_the_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)):
        parse_config(text, tmp_path / "c.toml")


BASE = '[[licence]]\nkey = "K"\nid = "x"\nproduct = "p"\nseats = 3\n'


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (BASE + 'count_by = "machine"', "licence[0].count_by"),
        (BASE + 'allow = ["group:nope"]', "licence[0].allow[0]"),
        (BASE + 'deny = ["colour:red"]', "licence[0].deny[0]"),
        (BASE + 'allow = ["ip:10.0.0.300/8"]', "licence[0].allow[0]"),
        (BASE + "reserve = { nope = 1 }", "licence[0].reserve.nope"),
        (BASE + "max = { planet = 1 }", "licence[0].max.planet"),
        (BASE + "overdraft = -1", "licence[0].overdraft"),
        (BASE + '[[licence.counter]]\nname = "s"\nlimit = 0', "licence[0].counter[0].limit"),
        (BASE + '[[licence.counter]]\nname = "s"\nlimit = 1\nreset = "weekly"', "reset"),
        (BASE + "[[licence.addon]]\nseats = 0", "licence[0].addon[0].seats"),
        (
            BASE + "[[licence.addon]]\nseats = 1\nstarts = 2027-01-02T00:00:00Z\n"
            "ends = 2027-01-01T00:00:00Z",
            "licence[0].addon[0].ends",
        ),
        ('[groups]\ncad = ["group:other"]', "groups.cad[0]"),
        ('[groups]\ncad = "user:alice"', "groups.cad"),
    ],
)
def test_policy_errors_name_the_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)):
        parse_config(text, tmp_path / "c.toml")


def test_rate_limits_and_audit_retention(tmp_path: Path) -> None:
    text = (
        f'[server]\nstate_dir = "{tmp_path}"\ndenied_rate = 2.5\ndenied_burst = 10\n'
        "checkout_rate = 100\ncheckout_burst = 50\n"
        '[audit]\nkeep = "30d"\nexport_dir = "/srv/audit"\ndenial_interval = "5m"\n'
    )
    config = parse_config(text, tmp_path / "c.toml")
    s = config.server
    assert (s.denied_rate, s.denied_burst, s.checkout_rate, s.checkout_burst) == (2.5, 10, 100, 50)
    assert config.audit == AuditConfig(
        keep=30 * 86400.0, export_dir=Path("/srv/audit"), denial_interval=300.0
    )
    assert config.audit_export_dir == Path("/srv/audit")
    default = parse_config(f'[server]\nstate_dir = "{tmp_path}"\n', tmp_path / "c.toml")
    assert default.audit.keep == 400 * 86400.0
    assert default.audit_export_dir == tmp_path / "audit-export"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\ndenied_rate = 0", "server.denied_rate: must be a number between 0.01 and"),
        ("[server]\ndenied_rate = nan", "server.denied_rate: must be a number between"),
        ("[server]\ncheckout_rate = '5'", "server.checkout_rate: must be a number between"),
        ("[server]\ncheckout_rate = true", "server.checkout_rate: must be a number between"),
        ("[server]\ndenied_burst = 0", "server.denied_burst: must be an integer between 1 and"),
        ("[server]\ncheckout_burst = 2.5", "server.checkout_burst: must be an integer between"),
        ('[audit]\nkeep = "12h"', "audit.keep: must be at least 1 day"),
        ('[audit]\nkeep = "40000d"', "audit.keep: must be at most 36600 days"),
        ('[audit]\nkeep = "forever"', "audit.keep: invalid duration 'forever'"),
        ('[audit]\nexport_dir = "relative"', "audit.export_dir: must be an absolute path"),
        ("[audit]\nexport_dir = 5", "audit.export_dir: must be an absolute path"),
        ('[audit]\ndenial_interval = "2h"', "audit.denial_interval: must be at most 3600 s"),
        ("[audit]\ndenial_interval = 0.5", "audit.denial_interval: must be at least 1 s"),
        ("[audit]\nkepe = 1", "audit.kepe: unknown key (did you mean 'keep'?)"),
        ("audit = 1", "audit: must be a table"),
    ],
)
def test_rate_limit_and_audit_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(text, tmp_path / "c.toml")


def test_renewals_per_second_reaches_the_engine(tmp_path: Path) -> None:
    config = parse_config("[server]\nrenewals_per_second = 50\n", tmp_path / "licd.toml")
    assert config.server.renewals_per_second == 50.0
    with pytest.raises(ConfigError, match=r"renewals_per_second"):
        parse_config("[server]\nrenewals_per_second = 0\n", tmp_path / "licd.toml")


VENDOR = '[vendor]\nkeys = ["%s"]\n' % ("cd" * 32)


def test_vendor_keys_and_entitlement_files(tmp_path: Path) -> None:
    text = VENDOR + '[[entitlement]]\nfile = "/etc/licd/a.toml"\n[[entitlement]]\nfile = "/b"\n'
    config = parse_config(text, tmp_path / "c.toml")
    assert config.vendor.keys == (bytes.fromhex("cd" * 32),)
    assert config.entitlement_files == (Path("/etc/licd/a.toml"), Path("/b"))
    bare = parse_config("", tmp_path / "c.toml")
    assert (bare.vendor.keys, bare.entitlement_files) == ((), ())


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[vendor]\nkeys = ["nothex"]', "vendor.keys[0]"),
        ('[vendor]\nkeys = "%s"' % ("cd" * 32), "vendor.keys: must be an array"),
        (VENDOR.replace('"]', '", "%s"]' % ("cd" * 32)), "vendor.keys[1]: duplicate"),
        ('[vendor]\nkey = ["%s"]' % ("cd" * 32), "vendor.key: unknown key"),
        (VENDOR + '[[entitlement]]\nfile = "relative.toml"', "entitlement[0].file"),
        (VENDOR + '[[entitlement]]\npath = "/a"', "entitlement[0].path: unknown key"),
        (VENDOR + '[entitlement]\nfile = "/a"', "entitlement: must be an array of tables"),
        (
            VENDOR + '[[entitlement]]\nfile = "/a"\n[[entitlement]]\nfile = "/a"',
            "entitlement[1].file: duplicate",
        ),
        ('[[entitlement]]\nfile = "/a"', "entitlement: entitlement files need the vendor's key"),
    ],
)
def test_vendor_and_entitlement_errors_name_the_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)):
        parse_config(text, tmp_path / "c.toml")


def test_the_store_is_sqlite_unless_postgres_is_named(tmp_path: Path) -> None:
    assert parse_config("", tmp_path / "c.toml").store == StoreConfig()
    text = (
        '[store]\nbackend = "postgres"\ndsn = "postgresql://licd@db/licd"\nnode = "a"\n'
        'advertise = "[::1]:27501"\nleader_ttl = "9s"\nlock_delay = 0\n'
    )
    assert parse_config(text, tmp_path / "c.toml").store == StoreConfig(
        backend="postgres",
        dsn="postgresql://licd@db/licd",
        node="a",
        advertise="[::1]:27501",
        leader_ttl=9.0,
        lock_delay=0.0,
    )
    with_file = '[store]\nbackend = "postgres"\ndsn_file = "/etc/licd/dsn"\n'
    assert parse_config(with_file, tmp_path / "c.toml").store.dsn_file == Path("/etc/licd/dsn")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('backend = "mysql"', 'store.backend: must be "sqlite" or "postgres"'),
        ('dsn = "postgresql://db/licd"', 'store.dsn: applies to backend = "postgres" only'),
        ('backend = "postgres"', 'store.dsn: backend = "postgres" needs one of dsn'),
        (
            'backend = "postgres"\ndsn = "postgresql://a@db/l"\ndsn_file = "/d"',
            'store.dsn: backend = "postgres" needs one of dsn',
        ),
        ('backend = "postgres"\ndsn = "postgresql://a:secret@db/l"', "store.dsn: holds a password"),
        ('backend = "postgres"\ndsn = "host=db password=x"', "store.dsn: holds a password"),
        ('backend = "postgres"\ndsn_file = "dsn"', "store.dsn_file: must be an absolute path"),
        ('backend = "postgres"\ndsn = "h"\nadvertise = "nohost"', "store.advertise: invalid"),
        (
            'backend = "postgres"\ndsn = "h"\nadvertise = "h:1"\nleader_ttl = "0.5s"',
            "store.leader_ttl: must be at",
        ),
        ('backend = "postgres"\ndsn = "h"\nnodes = "a"', "store.nodes: unknown key"),
        ('backend = "postgres"\ndsn = "h"', "store.advertise: required: the first [server] listen"),
    ],
)
def test_store_errors_name_the_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)):
        parse_config('[server]\nlisten = ["0.0.0.0:27500"]\n[store]\n' + text, tmp_path / "c.toml")


@pytest.mark.parametrize(
    ("policy", "where"),
    [
        ('borrow_after = "1d"', "borrow_after: must be shorter than max_ttl"),
        ('max_ttl = "7d"\nborrow_after = "7d"', "borrow_after: must be shorter than max_ttl"),
        ("borrow_max = 2", "borrow_max: needs borrow_after"),
        ('borrow_allow = ["group:nope"]', "borrow_allow[0]"),
        ('borrow_allow = ["user:a"]', "borrow_allow: needs borrow_after"),
        ('max_ttl = "7d"\nborrow_after = "1d"\nborrow_max = -1', "borrow_max: must be"),
    ],
)
def test_borrowing_errors_name_the_key(tmp_path: Path, policy: str, where: str) -> None:
    text = '[[licence]]\nkey = "K"\nid = "cad"\nproduct = "cad"\nseats = 3\n' + policy + "\n"
    with pytest.raises(ConfigError, match=re.escape(where)):
        parse_config(text, tmp_path / "c.toml")


def test_borrowing_policy_loads(tmp_path: Path) -> None:
    text = (
        '[groups]\ncad = ["user:alice"]\n[[licence]]\nkey = "K"\nid = "cad"\nproduct = "cad"\n'
        'seats = 3\nmax_ttl = "7d"\nborrow_after = "1d"\nborrow_max = 2\n'
        'borrow_allow = ["group:cad"]\n'
    )
    (licence,) = parse_config(text, tmp_path / "c.toml").licences
    assert (licence.borrow_after, licence.borrow_max, licence.borrow_allow) == (
        86400.0,
        2,
        ("group:cad",),
    )


def test_the_event_loop_is_uvloops_when_installed_unless_asyncio_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    import uvloop

    from licd.daemon import StartupError, event_loop_factory

    assert event_loop_factory("asyncio") is None
    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert event_loop_factory("auto") is None
    with pytest.raises(StartupError, match=r"pip install 'licd\[fast\]'"):
        event_loop_factory("uvloop")
