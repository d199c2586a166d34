"""Device classes, the vocabulary a worker and the job side share: how a card is named as a
Ray resource ("l4-24gb", "a100-80gb", "cpu") and what its name says about its memory."""

from __future__ import annotations

import re
from typing import Literal

DeviceKind = Literal["cuda", "rocm", "mps", "xpu", "cpu"]

# Memory sizes cards are sold with. Drivers report a little less (an 8 GB card: 7.79 GiB; a
# 16 GB T4: 14.6 GiB), so a reading is rounded up to the next of these.
CARD_SIZES_GB = (
    2, 3, 4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141, 192, 256, 288,
)


def nominal_gb(total_memory: int) -> int:
    """The size a card is sold as, from the bytes its driver reports."""
    gib = total_memory / 2**30
    for size in CARD_SIZES_GB:
        if gib <= size + 0.1:
            return size
    return round(gib)


_VENDOR_WORDS = {
    "nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "intel(r)", "intel",
    "graphics", "data", "center", "gpu", "(tm)", "apple",
}
_FORM_WORDS = re.compile(r"^(\d+gb|sxm\d*|pcie|hbm\d*e?|nvl|oam|max-q|mobile|laptop|edition)$")


def device_class_name(kind: DeviceKind, name: str, vram_gb: int | None) -> str:
    """A short Ray resource name: "rtx4090-24gb", "a100-80gb", "mi300x-192gb", "cpu", "mps"."""
    if kind in ("cpu", "mps"):
        return kind
    words = [w for w in re.split(r"[\s_/-]+", name.lower()) if w]
    model = [w for w in words if w not in _VENDOR_WORDS and not _FORM_WORDS.match(w)]
    slug = re.sub(r"[^a-z0-9]", "", "".join(model[:3])) or kind
    return f"{slug}-{vram_gb}gb" if vram_gb else slug


def class_memory_gb(device_class: str) -> int | None:
    """The memory a device class's card is sold with, as device_class_name wrote it into the
    name ("l4-24gb": 24); None for host classes ("cpu", "mps") and names without a size."""
    match = re.fullmatch(r"[a-z0-9]+-(\d+)gb", device_class)
    return int(match.group(1)) if match else None
