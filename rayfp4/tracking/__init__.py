"""MLflow tracking from the driver and rank 0: runs, params, metrics, artifacts, comparisons.

:class:`Tracker` wraps ``MlflowClient`` with explicit run ids (no global active-run state, so the
driver and a Ray worker can log to the same run) and never lets tracking stop training: when the
server cannot be reached it says so once and turns itself off. The default URI is a local SQLite
file, so ``mlflow ui --backend-store-uri sqlite:///mlruns.db`` shows the runs.
"""

from .compare import EvalResult, VariantResult, comparison_table, eval_table, plot_loss_curves, read_metrics
from .tracker import Tracker, resolve_tracking_uri

__all__ = ["EvalResult", "Tracker", "VariantResult", "comparison_table", "eval_table", "plot_loss_curves",
           "read_metrics", "resolve_tracking_uri"]
