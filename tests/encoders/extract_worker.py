"""Kill -9 target: one image extraction with decode worker processes, slowed down per batch.

    python tests/encoders/extract_worker.py MANIFEST SPEC STORE MARKER DECODE_WORKERS SLEEP

Touches MARKER once two batches are committed, so the test kills it mid-run, not before it starts.
"""

import sys
import time
from pathlib import Path

from encoders.extract import extract
from encoders.factory import load_encoder
from encoders.manifest import Manifest

manifest, spec, store, marker, workers, sleep = sys.argv[1:7]
batch = load_encoder(spec).spec.batch_size


def progress(done: int, total: int) -> None:
    if done >= 2 * batch:
        Path(marker).touch()
    time.sleep(float(sleep))


extract(Manifest.read(manifest), "image", load_encoder(spec), store, progress=progress, decode_workers=int(workers))
