"""saev-tools: mine the features of trained SAEs over an activation store.

* `tools.topk.run_topk`: one ordered pass over a store for every SAE of a run: per-latent frequencies, mean and
  max activations, activation counts (image, class, dataset), top-k exemplars two ways, label entropy.
* `tools.render.render`: exemplar grids with patch heatmaps, frequency/activation scatter, frequency histogram.
* `tools.report.build_report`: a static HTML report that opens from disk.

`tools.cli` is the `saev-tools` command, a thin face over these three.
"""
