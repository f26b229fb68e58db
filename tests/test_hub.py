"""Hub publishing: the SimMIM model card, and a push through scripts/push_to_hub.py to the local Hub-compatible server
of tests/hub_server.py, loaded back by stock transformers in a process where simmim_hf cannot be imported."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import HubServer
from huggingface_hub import ModelCard
from PIL import Image
from pretrain_helpers import TINY, run
from tiny_configs import tiny_simmim_config
from transformers import AutoImageProcessor, AutoModel, ViTImageProcessor

from simmim_hf import SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from simmim_hf.errors import HubPublishError, NotARunDirError
from simmim_hf.publish.hub import push_run_to_hub
from simmim_hf.publish.model_card import (
    eval_results_to_model_index,
    hub_dataset_id,
    render_model_card,
    write_model_card,
)
from simmim_hf.publish.run_dir import validate_run_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
PUSH_SCRIPT = REPO_ROOT / "scripts" / "push_to_hub.py"
TOKEN = f"hf_{secrets.token_hex(17)}"  # random, so a match in an upload can only be a leak
USER, ORG, READ_ONLY_ORG = "alice", "alice-lab", "big-corp"
REPO_ID = f"{ORG}/tiny-vit-simmim"

# ----------------------------------------------------------------------------------------------------------------------
# The run folder under test: a real tiny run of scripts/pretrain.py (the demo preset, a tiny ViT, real Fashion-MNIST
# images), so what is pushed is what a user's run writes: checkpoint, encoder/, simmim_run.json, pictures and card.
# ----------------------------------------------------------------------------------------------------------------------
EVAL_JSON = {
    "model": "runs/demo/encoder",
    "dataset": "fashion_mnist",
    "dataset_config": None,
    "split": "test",
    "seed": 0,
    "config": {"protocols": ["knn", "linear"]},
    "results": [
        {"protocol": "knn", "metric": "accuracy", "value": 0.73125, "dataset": "fashion_mnist", "split": "test",
         "train_samples": None, "seed": 0},
        {"protocol": "linear", "metric": "accuracy", "value": 0.6842, "dataset": "fashion_mnist", "split": "test",
         "train_samples": 1000, "seed": 0},
        {"protocol": "linear", "metric": "top5_accuracy", "value": 0.9871, "dataset": "fashion_mnist", "split": "test",
         "train_samples": 1000, "seed": 0},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(fashion_mnist_dir, tmp_path_factory) -> Path:
    """scripts/pretrain.py for 3 optimizer steps (2 accumulated batches of 8 each) on 48 Fashion-MNIST images."""
    output = tmp_path_factory.mktemp("run") / "demo"
    run([sys.executable, "scripts/pretrain.py", "--preset", "demo", "--config_overrides", TINY,
         "--dataset_name", "fashion-mnist", "--streaming", "false", "--max_train_samples", "48",
         "--output_dir", str(output), "--max_steps", "3", "--per_device_train_batch_size", "8",
         "--gradient_accumulation_steps", "2", "--warmup_steps", "1", "--logging_steps", "1", "--report_to", "none",
         "--num_visualize_images", "2", "--seed", "0"])  # fmt: skip
    return output


def run_summary(run_dir: Path) -> dict:
    """What the run recorded about itself (simmim_run.json)."""
    return json.loads((run_dir / "simmim_run.json").read_text())


@pytest.fixture(scope="module")
def eval_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.json"
    path.write_text(json.dumps(EVAL_JSON))
    return path


def copy_run(run_dir: Path, destination: Path, **summary_overrides) -> Path:
    """A copy of the run whose simmim_run.json has `summary_overrides` written over what the run recorded."""
    shutil.copytree(run_dir, destination)
    summary = {**run_summary(run_dir), **summary_overrides}
    (destination / "simmim_run.json").write_text(json.dumps(summary))
    return destination


# ----------------------------------------------------------------------------------------------------------------------
# The model card, without a server.
# ----------------------------------------------------------------------------------------------------------------------
def test_card_metadata_describes_a_stock_transformers_encoder(run_dir):
    data = render_model_card(run_dir, repo_id=REPO_ID, license="mit").data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-feature-extraction"
    assert data.license == "mit"
    assert {"simmim", "masked-image-modeling", "vision", "vit"} <= set(data.tags)
    assert data.datasets == ["zalando-datasets/fashion_mnist"]
    assert data.base_model is None
    assert data.eval_results is None


def test_card_model_index_carries_every_eval_result(run_dir, eval_path):
    results = render_model_card(run_dir, eval_results=eval_path, repo_id=REPO_ID).data.eval_results
    assert [r.metric_value for r in results] == [round(r["value"], 4) for r in EVAL_JSON["results"]]
    assert [r.metric_name.split()[0] for r in results] == ["kNN", "Linear", "Linear"]
    assert "top-5" in results[2].metric_name
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in results} == {
        ("image-classification", "zalando-datasets/fashion_mnist", "test")
    }


def test_card_body_shows_snippet_run_facts_picture_and_citation(run_dir, eval_path):
    text = render_model_card(run_dir, eval_results=eval_path, repo_id=REPO_ID).text
    assert f'AutoModel.from_pretrained("{REPO_ID}")' in text
    assert f'AutoImageProcessor.from_pretrained("{REPO_ID}")' in text
    summary = run_summary(run_dir)
    assert (summary["max_steps"], summary["global_batch_size"], summary["images_seen"]) == (3, 16, 48)
    for key in ("preset", "max_steps", "global_batch_size", "images_seen", "lr_scheduler_type", "precision"):
        value = summary[key]
        shown = f"{value:,}" if isinstance(value, int) else str(value)
        assert f"| {shown}" in text, key
    assert f"| Hardware | {summary['hardware']} |" in text
    assert [step for step, _ in summary["loss_curve"]] == [1, 2, 3]
    assert f"| Final reconstruction loss | {summary['final_loss']:.3g} |" in text
    for picture in ("reconstruction.png", "features_pca.png", "features_attention.png", "curves.png"):
        assert (run_dir / picture).is_file() and f"]({picture})" in text, picture
    assert f"{100 * EVAL_JSON['results'][1]['value']:.2f}%" in text
    assert "arxiv.org/abs/2111.09886" in text and "@inproceedings{xie2022simmim" in text


def test_card_shows_a_long_wall_time_in_hours(run_dir, tmp_path):
    long_run = copy_run(run_dir, tmp_path / "run", wall_time_seconds=3725)
    assert "| Wall time | 1h 02m 05s |" in render_model_card(long_run).text


def test_card_without_eval_base_model_hub_dataset_or_picture(run_dir, tmp_path):
    local_data = tmp_path / "my_images"
    local_data.mkdir()
    other = copy_run(run_dir, tmp_path / "run", base_model="me/vit-start", dataset_name=str(local_data))
    (other / "reconstruction.png").unlink()
    card = render_model_card(other)
    assert card.data.base_model == "me/vit-start"
    assert card.data.datasets is None
    assert "reconstruction.png" not in card.text
    assert "No evaluation results" in card.text
    assert str(other / "encoder") in card.text  # no repo id: the snippet points at the local folder


def _card_features(card_text: str, image: Image.Image) -> torch.Tensor:
    """Runs the card's first two Python snippets (load, then features) as a reader would, on `image`."""
    blocks = [block.split("\n", 1)[1] for block in card_text.split("```python")[1:3]]
    scope = {"image": image}
    for block in blocks:
        exec(block.split("```")[0], scope)
    return scope["features"]


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_card_features_are_the_evaluated_ones_and_the_pooler_is_flagged(run_dir, tmp_path, family):
    """The card's feature snippet gives what scripts/evaluate.py scores (the mean of the patch tokens), and where
    `pooler_output` is a layer SimMIM never trains (ViT: dense + tanh on CLS), the card says not to use it."""
    from tiny_configs import tiny_swin
    from transformers import SwinModel

    from simmim_hf.eval.features import extract_features, load_encoder

    other = copy_run(run_dir, tmp_path / "run", backbone=family)
    if family == "swin":
        shutil.rmtree(other / "encoder")
        SwinModel(tiny_swin()).save_pretrained(other / "encoder")
        ViTImageProcessor(size={"height": 32, "width": 32}, do_convert_rgb=True).save_pretrained(other / "encoder")
    text = render_model_card(other).text
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    expected = extract_features(load_encoder(str(other / "encoder")), [{"image": image}], "image")
    assert torch.allclose(_card_features(text, image), expected, atol=1e-5)
    if family == "vit":  # one CLS token, left out: hidden[:, 1:]
        assert "features = hidden[:, 1:].mean(dim=1)" in text
        assert "Do not use `pooler_output`" in text and "dense layer and tanh on the CLS token" in text
    else:  # Swin's pooler_output is the mean of last_hidden_state itself
        assert "features = hidden.mean(dim=1)" in text and "pooler_output" not in text


def test_card_without_baselines_says_how_to_add_them(run_dir, eval_path):
    text = render_model_card(run_dir, eval_results=eval_path).text
    assert "No baselines were scored: `scripts/evaluate.py --baselines`" in text
    assert "mean of the patch tokens (CLS and other" in text  # how the frozen features were pooled


def test_card_constants_mirror_the_backbone_tables():
    from simmim_hf import backbones
    from simmim_hf.publish import model_card

    assert model_card.PREFIX_TOKEN_NAMES == backbones.PREFIX_TOKENS
    assert model_card.CONV_TYPES == backbones.CONV_ENCODERS


def test_write_model_card_round_trips_through_modelcard_load(run_dir, eval_path, tmp_path):
    other = copy_run(run_dir, tmp_path / "run")
    path = write_model_card(other, eval_results=eval_path, repo_id=REPO_ID)
    assert path == other / "README.md"
    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == render_model_card(other, eval_results=eval_path, repo_id=REPO_ID).data.to_dict()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fashion_mnist", "zalando-datasets/fashion_mnist"),
        ("ILSVRC/imagenet-1k", "ILSVRC/imagenet-1k"),
        ("imagefolder", None),
        ("pipe:curl -s https://x/{000..009}.tar", None),
        (None, None),
    ],
)
def test_hub_dataset_id(name, expected):
    assert hub_dataset_id(name) == expected


def test_eval_results_reject_percentages():
    bad = {**EVAL_JSON, "results": [{**EVAL_JSON["results"][0], "value": 73.1}]}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        eval_results_to_model_index(bad)


def test_validate_run_dir_names_what_is_missing(run_dir, tmp_path):
    (tmp_path / "encoder").mkdir()
    with pytest.raises(NotARunDirError, match=r"simmim_run\.json.*encoder/config\.json.*encoder/model\.safetensors"):
        validate_run_dir(tmp_path)
    assert validate_run_dir(run_dir, include_full_checkpoint=True) == run_dir


def test_validate_run_dir_wants_a_simmim_config_for_the_full_checkpoint(run_dir, tmp_path):
    other = copy_run(run_dir, tmp_path / "run")
    (other / "config.json").write_text(json.dumps({"model_type": "vit"}))
    validate_run_dir(other)  # fine without the full checkpoint
    with pytest.raises(NotARunDirError, match="not 'simmim'"):
        validate_run_dir(other, include_full_checkpoint=True)


def test_script_rejects_a_folder_that_is_not_a_run_without_traceback(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("push_to_hub_script", PUSH_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses resolve the string annotations through sys.modules
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path), "--repo_id", REPO_ID]) == 1
    err = capsys.readouterr().err
    assert "is not a SimMIM pretraining output" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------------
# Pushing to the local Hub server, loading back with stock transformers.
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub():
    users = {TOKEN: (USER, {ORG: "admin", READ_ONLY_ORG: "read"}), "hf_other": ("mallory", {})}
    with HubServer(users=users) as server:
        yield server


def hub_env(hub: HubServer, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    """Environment of a process talking to the test server: online, empty cache and no stored token."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def push(hub: HubServer, home: Path, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PUSH_SCRIPT), *args]
    return subprocess.run(command, env=hub_env(hub, home, token), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pushed(hub, run_dir, eval_path, tmp_path_factory) -> subprocess.CompletedProcess:
    home = tmp_path_factory.mktemp("hf_home")
    result = push(hub, home, str(run_dir), "--repo_id", REPO_ID, "--eval_results", str(eval_path),
                  "--include_full_checkpoint", "--private")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def head_files(hub: HubServer, repo_id: str = REPO_ID, branch: str = "main") -> dict[str, bytes]:
    repo = hub.state.repos[repo_id]
    return repo.commits[repo.refs[branch]]


def test_push_makes_one_commit_with_the_card_last(hub, pushed, run_dir):
    repo = hub.state.repos[REPO_ID]
    assert repo.private
    commit = [r for r in hub.state.requests if r.method == "POST" and r.path == f"/api/models/{REPO_ID}/commit/main"]
    assert len(commit) == 1
    paths = [json.loads(line)["value"].get("path") for line in commit[0].body.splitlines()[1:]]
    assert paths[-1] == "README.md"
    files = head_files(hub)
    encoder = {"config.json", "model.safetensors", "preprocessor_config.json"}
    pictures = {path.name for path in run_dir.glob("*.png")}  # every picture the run wrote at its top level
    assert pictures >= {"reconstruction.png", "features_pca.png", "features_attention.png", "curves.png"}, pictures
    assert {name for name in files if not name.startswith(("simmim/", "."))} == encoder | pictures | {"README.md"}
    for name in encoder:
        assert files[name] == (run_dir / "encoder" / name).read_bytes()
    for name in pictures:
        assert files[name] == (run_dir / name).read_bytes()
    assert pushed.stdout.strip().endswith(f"/{REPO_ID}/commit/{repo.refs['main']}")


def test_pushed_card_states_what_the_run_recorded(hub, pushed, run_dir):
    summary, text = run_summary(run_dir), ModelCard(head_files(hub)["README.md"].decode()).text
    assert f"| Optimizer steps | {summary['max_steps']} |" in text
    assert f"| Images seen | {summary['images_seen']} |" in text
    assert f"| Final reconstruction loss | {summary['final_loss']:.3g} |" in text
    assert f"transformers {summary['transformers_version']}, torch {summary['torch_version']}" in text


def test_push_adds_the_full_checkpoint_under_simmim(hub, pushed, run_dir):
    files = head_files(hub)
    local = {"config.json", "model.safetensors", *(path.name for path in run_dir.glob("*.py"))}
    assert any(name.endswith(".py") for name in local)  # save_pretrained wrote the remote-code files
    assert {path.removeprefix("simmim/") for path in files if path.startswith("simmim/")} == local
    for name in local:
        assert files[f"simmim/{name}"] == (run_dir / name).read_bytes()


DOWNSTREAM = """
import importlib.abc, json, sys
class RefuseSimMIM(importlib.abc.MetaPathFinder):  # the user of the repo does not have simmim_hf
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "simmim_hf":
            raise ImportError("simmim_hf must not be needed downstream")
sys.meta_path.insert(0, RefuseSimMIM())

import numpy as np, torch
from PIL import Image
from huggingface_hub import HfApi, ModelCard
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

repo, images_path, out = sys.argv[1:4]
images = [Image.fromarray(array) for array in np.load(images_path)]  # greyscale, 28x28
processor = AutoImageProcessor.from_pretrained(repo)
model = AutoModel.from_pretrained(repo).eval()
inputs = processor(images=images, return_tensors="pt")
extractor = pipeline(model=repo)  # no task given: it comes from the card's pipeline_tag
classifier = AutoModelForImageClassification.from_pretrained(repo, num_labels=10).eval()
with torch.no_grad():
    features = model(**inputs).last_hidden_state
    backbone = classifier.base_model(**inputs).last_hidden_state
    logits = classifier(**inputs).logits
np.savez(out + ".npz", features=features.numpy(), backbone=backbone.numpy(), logits=logits.numpy(),
         pipeline=np.stack([np.asarray(extractor(image))[0] for image in images]))
card = ModelCard.load(repo)
json.dump({"task": extractor.task, "model_class": type(model).__name__, "card": card.data.to_dict(),
           "files": HfApi().list_repo_files(repo),
           "simmim_hf_imported": any(name.split(".")[0] == "simmim_hf" for name in sys.modules)}, open(out, "w"))
"""


@pytest.fixture(scope="module")
def fashion_images(fashion_mnist_dir, tmp_path_factory) -> Path:
    from simmim_hf.data.fashion_mnist import load_fashion_mnist

    path = tmp_path_factory.mktemp("images") / "images.npy"
    np.save(path, load_fashion_mnist("test", fashion_mnist_dir)[0][:3])
    return path


@pytest.fixture(scope="module")
def downstream(hub, pushed, fashion_images, tmp_path_factory) -> tuple[dict, dict[str, np.ndarray], str]:
    """Runs DOWNSTREAM against the pushed repo in a fresh process; returns its report, arrays and output."""
    work = tmp_path_factory.mktemp("downstream")
    out = str(work / "report.json")
    result = subprocess.run(
        [sys.executable, "-c", DOWNSTREAM, REPO_ID, str(fashion_images), out],
        env=hub_env(hub, work / "hf_home"),
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    arrays = dict(np.load(out + ".npz"))
    return json.loads(Path(out).read_text()), arrays, result.stdout + result.stderr


@pytest.fixture(scope="module")
def local_features(run_dir, fashion_images) -> np.ndarray:
    processor = AutoImageProcessor.from_pretrained(run_dir / "encoder")
    model = AutoModel.from_pretrained(run_dir / "encoder").eval()
    images = [Image.fromarray(array) for array in np.load(fashion_images)]
    with torch.no_grad():
        return model(**processor(images=images, return_tensors="pt")).last_hidden_state.numpy()


def test_downstream_process_never_imports_simmim_hf(downstream):
    report, _, _ = downstream
    assert report["simmim_hf_imported"] is False
    assert report["model_class"] == "ViTModel"


def test_stock_automodel_features_equal_local_encoder(downstream, local_features):
    _, arrays, _ = downstream
    np.testing.assert_allclose(arrays["features"], local_features, atol=1e-5)


def test_pipeline_takes_greyscale_images_and_its_task_from_the_card(downstream, local_features):
    report, arrays, _ = downstream
    assert report["task"] == "image-feature-extraction"
    np.testing.assert_allclose(arrays["pipeline"], local_features, atol=1e-5)


def test_image_classification_model_starts_from_the_pretrained_encoder(downstream, local_features):
    _, arrays, _ = downstream
    assert arrays["logits"].shape == (len(local_features), 10)
    np.testing.assert_allclose(arrays["backbone"], local_features, atol=1e-5)


def test_hub_lists_what_the_push_committed(hub, downstream):
    assert sorted(downstream[0]["files"]) == sorted(head_files(hub))


def test_card_metadata_reads_back_from_the_hub(downstream):
    card = downstream[0]["card"]
    assert card["library_name"] == "transformers" and card["pipeline_tag"] == "image-feature-extraction"
    assert {"simmim", "masked-image-modeling", "vision", "vit"} <= set(card["tags"])
    assert card["datasets"] == ["zalando-datasets/fashion_mnist"]
    metrics = card["model-index"][0]["results"][0]["metrics"]
    assert [metric["value"] for metric in metrics] == [round(r["value"], 4) for r in EVAL_JSON["results"]]


SIMMIM_RELOAD = """
import sys, torch
from simmim_hf import SimMIMForMaskedImageModeling, SimMIMMaskGenerator
model = SimMIMForMaskedImageModeling.from_pretrained(sys.argv[1], subfolder="simmim").eval()
generator = torch.Generator().manual_seed(0)
pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
mask = SimMIMMaskGenerator.from_config(model.config)(2, generator=generator)
with torch.no_grad():
    torch.save(model(pixel_values, bool_masked_pos=mask).reconstruction, sys.argv[2])
"""


def test_full_checkpoint_reloads_from_the_simmim_subfolder(hub, pushed, run_dir, tmp_path):
    out = tmp_path / "reconstruction.pt"
    result = subprocess.run(
        [sys.executable, "-c", SIMMIM_RELOAD, REPO_ID, str(out)],
        env=hub_env(hub, tmp_path / "hf_home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    local = SimMIMForMaskedImageModeling.from_pretrained(run_dir).eval()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    mask = SimMIMMaskGenerator.from_config(local.config)(2, generator=generator)
    with torch.no_grad():
        expected = local(pixel_values, bool_masked_pos=mask).reconstruction
    torch.testing.assert_close(torch.load(out, weights_only=True), expected)


def test_token_is_never_uploaded_or_printed(hub, pushed, downstream):
    needles = [TOKEN.encode(), base64.b64encode(TOKEN.encode())]
    for request in hub.state.requests:
        assert not any(needle in request.body for needle in needles), request.path
    for repo in hub.state.repos.values():
        for files in repo.commits.values():
            assert not any(TOKEN.encode() in content for content in files.values())
    assert TOKEN not in pushed.stdout + pushed.stderr
    assert TOKEN not in downstream[2]


def test_push_refuses_files_that_contain_the_token(run_dir, tmp_path):
    other = copy_run(run_dir, tmp_path / "run")
    config = json.loads((other / "encoder" / "config.json").read_text())
    (other / "encoder" / "config.json").write_text(json.dumps({**config, "note": f"pushed with {TOKEN}"}))
    # The scan runs before any network traffic, so this needs no server (this process is offline anyway).
    with pytest.raises(HubPublishError, match=r"token appears in config\.json") as raised:
        push_run_to_hub(other, f"{USER}/leaky", token=TOKEN)
    assert TOKEN not in str(raised.value)


def test_push_without_a_token_fails_cleanly(hub, run_dir, tmp_path):
    result = push(hub, tmp_path / "home", str(run_dir), "--repo_id", f"{USER}/no-token", token=None)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "HF_TOKEN" in result.stderr and "hf auth login" in result.stderr
    assert f"{USER}/no-token" not in hub.state.repos


def test_push_to_someone_elses_namespace_fails_cleanly(hub, run_dir, tmp_path):
    result = push(hub, tmp_path / "home", str(run_dir), "--repo_id", "mallory/stolen")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "'mallory' is neither your user nor one of your organizations" in result.stderr
    assert "mallory/stolen" not in hub.state.repos


def test_push_refused_by_the_server_fails_cleanly(hub, run_dir, tmp_path):
    # A member of the org with a read-only role passes the whoami check; the server answers 403.
    result = push(hub, tmp_path / "home", str(run_dir), "--repo_id", f"{READ_ONLY_ORG}/model")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "(403)" in result.stderr
    assert f"{READ_ONLY_ORG}/model" not in hub.state.repos


def test_push_to_a_new_branch_leaves_main_alone(hub, pushed, run_dir, tmp_path):
    main_before = hub.state.repos[REPO_ID].refs["main"]
    other = copy_run(run_dir, tmp_path / "run", max_steps=99)
    result = push(hub, tmp_path / "home", str(other), "--repo_id", REPO_ID, "--revision", "more-steps")
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.state.repos[REPO_ID]
    assert repo.refs["main"] == main_before
    card = ModelCard(head_files(hub, branch="more-steps")["README.md"].decode())
    assert "| Optimizer steps | 99 |" in card.text and card.data.eval_results is None


@pytest.mark.parametrize("backbone", ["vit", "swin", "beit"])
def test_exported_encoder_takes_greyscale_images_through_stock_processor_and_pipeline(backbone, tmp_path):
    from transformers import pipeline

    from simmim_hf import export_encoder

    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(tiny_simmim_config(backbone)).eval()
    folder = export_encoder(model, tmp_path / "encoder")
    image = Image.fromarray((np.arange(28 * 28).reshape(28, 28) % 255).astype(np.uint8))  # greyscale ("L")
    # The card's snippet calls the processor directly; without do_convert_rgb it rejects 1-channel images.
    assert json.loads((folder / "preprocessor_config.json").read_text()).get("do_convert_rgb") is True
    pixel_values = AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    features = np.asarray(pipeline("image-feature-extraction", model=str(folder))(image))
    assert features.shape[0] == 1 and np.isfinite(features).all()
