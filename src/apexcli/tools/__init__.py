"""Tools that sit above the library: they build and measure the `mini` world's pipeline with the
library's models, rewards and config (``python -m apexcli.tools.mini_pretrain``,
``python -m apexcli.tools.mini_evaluate``)."""
