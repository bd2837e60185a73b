"""The built-in models. A regular install ships this folder as the package `reformer_export_models`
(pyproject.toml); exporters.models.find_models_dir finds it there, or here in a source checkout."""
