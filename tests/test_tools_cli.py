"""`saev-tools topk / render / report` on an exported training run, end to end through the CLI."""

import json
import os

import torch
from click.testing import CliRunner
from PIL import Image

from tools.cli import main
from tools.topk import load_topk
from tools_helpers import assert_matches_oracle, export_sae, make_sae, make_store, oracle_latents, oracle_stats

torch.set_num_threads(2)


def test_cli_run_topk_render_report(tmp_path):
    store = tmp_path / "s.zarr"
    x, labels, valid = make_store(store, 20, grid=(4, 4), images_per_chunk=6)
    run = tmp_path / "runs" / "r"
    saes = {"w16": make_sae(8, 16, seed=1, store=store), "w24": make_sae(8, 24, seed=2, store=store)}
    for name, sae in saes.items():
        export_sae(run / name, sae)
    (run / "run.json").write_text(json.dumps({"saes": list(saes), "store": str(store), "hook": "blocks.1", "tokens": "patches"}))
    cli = CliRunner()

    r = cli.invoke(main, ["topk", str(run), "-k", "3", "--block-images", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"topk: {run / 'topk'}" in r.output
    for name, sae in saes.items():  # the files the CLI wrote hold the brute-force statistics
        z, images = oracle_latents(x, valid, sae, (4, 4))
        data = load_topk(run / "topk", name)
        assert_matches_oracle(data.stats, oracle_stats(z, images, labels[valid], k=3, tau=0.2, n_classes=3), data.image_counts(), images)

    r = cli.invoke(main, ["topk", str(run), "--quiet"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--overwrite" in r.output

    r = cli.invoke(main, ["topk", str(run / "w16"), "--out", str(tmp_path / "one"), "--tau", "0.5", "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_topk(tmp_path / "one").index["tau"] == 0.5

    r = cli.invoke(main, ["render", str(run / "topk"), "--quiet"])
    assert r.exit_code == 2 and "--sae" in r.output
    r = cli.invoke(main, ["render", str(run / "topk"), "--sae", "w24", "--latents", "0,1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert os.path.isfile(run / "topk" / "w24" / "render" / "latent_1_mean.png")
    assert "dataset" in r.output  # the test store records no dataset: a warning, not a crash
    r = cli.invoke(main, ["render", str(run / "topk"), "--sae", "w24", "--latents", "99", "--quiet"])
    assert r.exit_code == 2 and "outside" in r.output
    # --tile-px and --cols reach the grid: a tile that never fired is one grey square (tools.images.grid_image:
    # n_cols * (tile + 2) + 2 wide); latent 0 of this run has exemplars, so its grid is at most 2 tiles wide.
    r = cli.invoke(main, ["render", str(run / "topk"), "--sae", "w24", "--latents", "0", "--tile-px", "40", "--cols", "2",
                          "--out", str(tmp_path / "tiles"), "--quiet"])
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "tiles" / "latent_0_max.png") as im:
        assert im.width in (40 + 4, 2 * 42 + 2) and (im.height - 2) % 42 == 0

    r = cli.invoke(main, ["report", str(run / "topk"), "--max-pages", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    index = run / "topk" / "report" / "index.html"
    assert f"report: {index}" in r.output and index.is_file()
    assert len(os.listdir(run / "topk" / "report" / "w16" / "latents")) <= 3


def test_under_a_launcher_every_process_refuses_in_one_line(tmp_path):
    """torchrun/accelerate set WORLD_SIZE; every process would mine into the same folder, so each refuses."""
    r = CliRunner().invoke(main, ["topk", str(tmp_path / "run")], env={"WORLD_SIZE": "2", "RANK": "1"})
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "without torchrun or accelerate launch" in r.output
    assert not (tmp_path / "run").exists()
