"""The static HTML report: its files, and a real headless Chromium following its links (no server)."""

import html.parser
import os
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image

from saev_store.datasets import create_dataset
from saev_store.models.preprocess import PreprocessConfig
from tools.report import build_report
from tools.topk import load_topk, run_topk
from tools_helpers import make_sae, make_store

torch.set_num_threads(2)
D_SAE = 20
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def report(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    n = 24
    for i in range(n):
        cls = ["cat", "dog"][i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    src = create_dataset("folder", root=str(root))
    pre = PreprocessConfig(image_size=(32, 32), resize=None, crop="none")
    store = tmp_path / "s.zarr"
    make_store(store, n, grid=(4, 4), dataset=src.describe(), preprocessing=pre.to_dict(), class_names=src.class_names, labels=src.labels())
    run_topk({"sae one": make_sae(8, D_SAE, seed=7), "b": make_sae(8, 6, seed=8)}, store, tmp_path / "topk", k=4, quiet=True)
    res = build_report(tmp_path / "topk", tmp_path / "report", max_pages=8, quiet=True)
    return tmp_path, res


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.srcs, self.rows = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a":
            self.hrefs.append(a["href"])
        if tag in ("img", "script", "link"):
            self.srcs.append(a.get("src") or a.get("href"))
        if tag == "tr" and "data-latent" in a:
            self.rows.append(a)


def _parse(fpath):
    p = _Links()
    p.feed(open(fpath).read())
    return p


def test_report_files_link_up(report):
    tmp_path, res = report
    assert res.warning is None
    top = _parse(res.index_fpath)
    assert urllib.parse.quote("sae one") + "/index.html" in top.hrefs
    sae_dir = tmp_path / "report" / "sae one"
    idx = _parse(sae_dir / "index.html")
    stats = load_topk(tmp_path / "topk", "sae one").stats
    assert [int(r["data-latent"]) for r in idx.rows] == list(range(D_SAE))
    np.testing.assert_allclose([float(r["data-freq"]) for r in idx.rows], stats.freq_patch, rtol=1e-12)
    pages = res.pages["sae one"]
    assert 0 < len(pages) <= 8 and all(stats.n_images_active[i] > 0 for i in pages)
    assert sorted(h for h in idx.hrefs if h.startswith("latents/")) == sorted(f"latents/{i}.html" for i in pages)
    for i in pages:
        page = _parse(sae_dir / "latents" / f"{i}.html")
        for src in page.srcs:  # every image, script and stylesheet a page names exists on disk
            assert os.path.isfile(os.path.normpath(sae_dir / "latents" / src)), src
        assert sum(s.endswith(".png") for s in page.srcs) == 3  # max, mean and PatchSAE's ranking


@pytest.mark.slow
def test_report_in_headless_chromium(report):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    tmp_path, res = report
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.get("file://" + os.path.abspath(res.index_fpath))
        driver.find_element(By.LINK_TEXT, "sae one").click()
        assert driver.current_url.endswith("/sae%20one/index.html")
        rows = driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
        assert [int(r.get_attribute("data-latent")) for r in rows] == list(range(D_SAE))
        stats = load_topk(tmp_path / "topk", "sae one").stats

        def visible_freqs():
            return [float(r.get_attribute("data-freq")) for r in driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr") if r.is_displayed()]

        header = driver.find_element(By.CSS_SELECTOR, "th[data-key=freq]")
        header.click()
        assert visible_freqs() == sorted(stats.freq_patch.tolist(), reverse=True)
        header.click()
        assert visible_freqs() == sorted(stats.freq_patch.tolist())
        cut = float(np.median(stats.freq_patch))
        driver.find_element(By.ID, "freq-min").send_keys(repr(cut))
        assert sorted(visible_freqs()) == sorted(v for v in stats.freq_patch.tolist() if v >= cut)
        assert int(driver.find_element(By.ID, "n-shown").text) == int((stats.freq_patch >= cut).sum())
        driver.find_element(By.ID, "freq-min").clear()
        driver.find_element(By.ID, "freq-min").send_keys("0")

        i = res.pages["sae one"][0]
        driver.find_element(By.CSS_SELECTOR, f"a[href='latents/{i}.html']").click()
        assert f"Latent {i}" in driver.find_element(By.TAG_NAME, "h1").text
        imgs = driver.find_elements(By.CSS_SELECTOR, "img.grid")
        assert len(imgs) == 3
        for img in imgs:
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
    finally:
        driver.quit()
