"""The rescue media's kernel parameters: the contract's names parse; bad or unstable ones are refused."""

from __future__ import annotations

import pytest

from imgbackup.engine.rescue.params import Location, TargetSpec, parse_params, raw_params
from imgbackup.errors import UsageError

CONTRACT = ("BOOT_IMAGE=/imgbackup/vmlinuz boot=imgbackup console=ttyS0 imgbackup.action=restore "
            "imgbackup.repo=LABEL=BACKUP:/repo imgbackup.image=latest imgbackup.name=sda "
            "imgbackup.target=/dev/disk/by-id/ata-WDC_WD40EFRX_WD-WCC4E1234567 "
            "imgbackup.passphrase-file=LABEL=BACKUP:/pass imgbackup.grow=yes imgbackup.after=poweroff "
            "imgbackup.on-failure=poweroff")


def test_the_contract_example_parses() -> None:
    p = parse_params(CONTRACT)
    assert p.action == "restore" and p.image == "latest" and p.name == "sda" and p.grow
    assert p.repo == Location("LABEL=BACKUP", "/repo")
    assert p.passphrase_file == Location("LABEL=BACKUP", "/pass")
    assert p.target == TargetSpec("by-id", "/dev/disk/by-id/ata-WDC_WD40EFRX_WD-WCC4E1234567")
    assert p.after == "poweroff" and p.on_failure == "poweroff" and p.unknown == ()


def test_defaults_without_an_action_are_the_menu_and_a_shell() -> None:
    p = parse_params("quiet boot=imgbackup")
    assert p.action == "menu" and p.after == "shell" and p.on_failure == "shell"


def test_a_later_word_overrides_a_baked_one() -> None:
    """What an operator types at the boot menu comes after the entry's own words and wins."""
    assert raw_params("imgbackup.after=poweroff imgbackup.after=shell")["after"] == "shell"
    assert parse_params(CONTRACT + " imgbackup.action=shell").action == "shell"


@pytest.mark.parametrize("target", ["/dev/sda", "/dev/vdb", "/dev/nvme0n1", "first", "auto", "/dev/hda",
                                    "/dev/mmcblk0", "/dev/disk/by-path/pci-0000:00:1f.2-ata-1", "sda"])
def test_unstable_target_names_are_refused(target: str) -> None:
    with pytest.raises(UsageError, match="stable identity"):
        parse_params(CONTRACT + f" imgbackup.target={target}")


@pytest.mark.parametrize(("target", "spec"), [
    ("WWN=0x5000C500A1B2C3D4", TargetSpec("wwn", "0x5000c500a1b2c3d4")),
    ("wwn=5000c500a1b2c3d4", TargetSpec("wwn", "0x5000c500a1b2c3d4")),
    ("SERIAL=S3Z9NB0K123456", TargetSpec("serial", "S3Z9NB0K123456")),
    ("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4", TargetSpec("by-id", "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4")),
])
def test_stable_target_forms(target: str, spec: TargetSpec) -> None:
    assert parse_params(CONTRACT + f" imgbackup.target={target}").target == spec


@pytest.mark.parametrize(("word", "message"), [
    ("imgbackup.action=wipe", "expected one of restore, menu, shell"),
    ("imgbackup.after=halt", "expected one of poweroff, reboot, shell"),
    ("imgbackup.grow=maybe", "expected yes or no"),
    ("imgbackup.repo=BACKUP:/repo", "expected DEVICE:/PATH"),
    ("imgbackup.repo=LABEL=BACKUP:repo", "must be absolute"),
    ("imgbackup.repo=LABEL=BACKUP:/a/../b", "without '..'"),
    ("imgbackup.wait=soon", "whole number"),
    ("imgbackup.target=WWN=xyz", "hex digits"),
])
def test_bad_values_name_the_parameter(word: str, message: str) -> None:
    with pytest.raises(UsageError, match="imgbackup.") as err:
        parse_params(f"{CONTRACT} {word}")
    assert message in str(err.value)


def test_restore_needs_repo_target_and_a_name_for_latest() -> None:
    for drop in ("imgbackup.repo=", "imgbackup.target="):
        words = " ".join(w for w in CONTRACT.split() if not w.startswith(drop))
        with pytest.raises(UsageError, match="needs " + drop.rstrip("=")):
            parse_params(words)
    no_name = " ".join(w for w in CONTRACT.split() if not w.startswith("imgbackup.name="))
    with pytest.raises(UsageError, match="needs imgbackup.name"):
        parse_params(no_name)
    assert parse_params(no_name.replace("image=latest", "image=3f2a9c")).image == "3f2a9c"


def test_unknown_parameters_are_reported_not_fatal() -> None:
    assert parse_params(CONTRACT + " imgbackup.colour=blue").unknown == ("colour",)


def test_embedded_repository_and_plain_paths() -> None:
    p = parse_params(CONTRACT.replace("LABEL=BACKUP:/repo", "MEDIA:/imgbackup/repo"))
    assert p.repo == Location("MEDIA", "/imgbackup/repo")
    assert parse_params(CONTRACT.replace("LABEL=BACKUP:/repo", "/mnt/repo")).repo == Location(None, "/mnt/repo")
