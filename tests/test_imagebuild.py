"""The image harness's reading of this machine: apt's Debian mirror and the pip settings given to the base."""

from __future__ import annotations

import configparser
from pathlib import Path

import imagebuild
import pytest


def test_mirror_from_deb822_sources_skipping_disabled_stanzas_and_other_suites(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian http://second.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    (tmp_path / "sources.list.d" / "other.list.disabled").write_text("deb http://ignored.example/ bookworm main\n")
    assert imagebuild.debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_from_a_one_line_list_with_options(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("# deb http://commented.example/ bookworm main\n"
                                           "deb [arch=amd64 signed-by=/k] http://one.example/debian bookworm main\n")
    assert imagebuild.debian_mirror(tmp_path) == "http://one.example/debian"


def test_no_bookworm_source_says_so(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://one.example/debian trixie main\n")
    with pytest.raises(imagebuild.Unavailable, match="no Debian 'bookworm' source"):
        imagebuild.debian_mirror(tmp_path)


def test_pip_environment_is_merged_into_the_host_pip_conf(tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n[install]\nno-compile = true\n")
    text = imagebuild.pip_settings({"PIP_DEFAULT_TIMEOUT": "180", "PIP_INDEX_URL": "http://idx.example/simple",
                                    "PIP_CONFIG_FILE": "/elsewhere", "HOME": "/root"}, conf)
    assert text is not None
    parsed = configparser.RawConfigParser()
    parsed.read_string(text)  # strict: a repeated section would raise, as it does in pip
    assert dict(parsed["global"]) == {"cert": "/etc/ssl/certs/ca-certificates.crt", "default-timeout": "180",
                                      "index-url": "http://idx.example/simple"}
    assert dict(parsed["install"]) == {"no-compile": "true"}


def test_no_pip_settings_gives_no_file(tmp_path: Path) -> None:
    assert imagebuild.pip_settings({"HOME": "/root"}, tmp_path / "absent.conf") is None
