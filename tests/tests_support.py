"""Constants shared by tests (a plain module: conftest files are not for importing)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ROOT / "data" / "models" / "xmodal-tiny-vit.json"
TINY_RN = ROOT / "data" / "models" / "xmodal-tiny-rn.json"
