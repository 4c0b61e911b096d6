"""Where the recipes' ``class_path: lightning_gf.data.X`` resolve: the data modules of
:mod:`lightning_gf.app.data`, under the path they had before the package took layers."""

from lightning_gf.app.data import *  # noqa: F401,F403
from lightning_gf.app.data import __all__  # noqa: F401
