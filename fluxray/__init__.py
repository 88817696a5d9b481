"""fluxray: train FLUX.1 LoRAs on Ray, track them in MLflow, serve them over HTTP."""

__version__ = "0.1.0"
