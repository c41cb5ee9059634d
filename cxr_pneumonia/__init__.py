"""cxr-pneumonia's entry points (the `cxr` command, `cxr predict`, server checks, the served MLflow model).

The layers below it install under this name too, so no bare `tasks` or `flows` package lands in a user's
environment: `cxr_pneumonia.tasks` is the checkout's tasks/ folder and `cxr_pneumonia.flows` its flows/ folder
(pyproject.toml maps them). The library stays `cxr_model`. Nothing runs at import.
"""
