"""The Gradio page, one module per tab (compare, prompt_sets, sensitivity, kld) plus rendering
(render) and what the tabs share (common). Each tab module owns its layout and handlers and returns
the components another tab wires to; handlers call :mod:`dtm_core.jobs` and format its results."""
