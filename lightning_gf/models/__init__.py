"""Where the recipes' ``class_path: lightning_gf.models.X`` resolve: the task modules of
:mod:`lightning_gf.app.models`, under the path they had before the package took layers."""

from lightning_gf.app.models import *  # noqa: F401,F403
from lightning_gf.app.models import __all__  # noqa: F401
