"""Named device profiles (`configs/devices/NAME.yaml`) that `storage.device_profile` applies.

Why profiles: the emulation throttles and energy constants describe a device class (a PCIe
Gen3 x4 computational SSD, an NVMe SSD behind its host link, a CXL memory expander); a
profile names one such class once, with the sources of its figures, so a run says
`--device-profile NAME` instead of copying eight numbers. A profile file:

    description: one line
    sources: [where each figure comes from, ...]     (required, not empty)
    storage:                                         (only these keys)
      cache_bytes: ...                               on-device DRAM for rows
      emulation: {flash_read_bandwidth_mbps: ..., ...}
      energy: {dram_pj_per_byte: ..., ...}

The profile sits *under* the config: a key the config sets itself wins, so a benchmark that
sizes `storage.cache_bytes` per scenario keeps its size. Applied on the raw mapping, before
the typed tree is built, so every field is validated as if the config had written it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ndp.config_loader import load_yaml
from ndp.errors import ConfigError

DEVICES_DIR = Path(__file__).resolve().parent.parent / "configs" / "devices"
PROFILE_KEYS = {"description", "sources", "storage"}
PROFILE_STORAGE_KEYS = {"cache_bytes", "emulation", "energy"}


def profile_names() -> list[str]:
    """Names of the shipped profiles (file stems of `configs/devices/*.yaml`)."""
    return sorted(p.stem for p in DEVICES_DIR.glob("*.yaml"))


def load_profile(name: str) -> dict[str, Any]:
    """The raw profile `name`; ConfigError naming the known ones if there is none."""
    path = DEVICES_DIR / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise ConfigError(
            f"storage.device_profile: no device profile {name!r}; known: "
            f"{', '.join(profile_names()) or 'none'} (files in {DEVICES_DIR})"
        )
    profile = load_yaml(path.read_text(), source=str(path)) or {}
    where = f"{path}"
    if not isinstance(profile, dict) or set(profile) - PROFILE_KEYS:
        extra = sorted(set(profile) - PROFILE_KEYS) if isinstance(profile, dict) else profile
        raise ConfigError(f"{where}: unknown keys {extra}; allowed: {sorted(PROFILE_KEYS)}")
    if not profile.get("sources"):
        raise ConfigError(f"{where}: sources: a profile names where its figures come from")
    storage = profile.get("storage") or {}
    if not isinstance(storage, dict) or set(storage) - PROFILE_STORAGE_KEYS:
        extra = (
            sorted(set(storage) - PROFILE_STORAGE_KEYS) if isinstance(storage, dict) else storage
        )
        raise ConfigError(
            f"{where}: storage: unknown keys {extra}; allowed: {sorted(PROFILE_STORAGE_KEYS)}"
        )
    return profile


def apply_device_profile(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with its `storage.device_profile`'s settings under the keys it sets itself."""
    storage = raw.get("storage")
    if not isinstance(storage, dict) or not isinstance(storage.get("device_profile"), str):
        return raw  # no profile (or a wrong type, which the typed loader reports)
    profile = load_profile(storage["device_profile"])
    merged = _under(copy.deepcopy(profile.get("storage") or {}), storage)
    return {**raw, "storage": merged}


def _under(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` merged over `base`, mapping by mapping (`top` wins)."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _under(base[key], value)
        else:
            base[key] = value
    return base
