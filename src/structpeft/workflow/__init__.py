"""The fine-tuning workflow: command line, recipes, model presets, tasks, training loop, results.

Built on structpeft's public API only; the library never imports it.
"""
