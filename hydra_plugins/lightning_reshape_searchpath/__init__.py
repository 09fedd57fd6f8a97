"""Hydra SearchPathPlugin: an installed lightning-reshape exposes its configs to any Hydra app.

Hydra imports every module under the ``hydra_plugins`` namespace at start-up; this one adds
``pkg://lightning_reshape.configs`` to the search path (so ``defaults: [parallel: tp2]``
works in a user's app) and registers the structured-config schemas that validate them.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from lightning_reshape.schema import register_schemas


class LightningReshapeSearchPathPlugin(SearchPathPlugin):
    """Appends lightning-reshape's config groups (parallel, strategy, trainer, ...)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        register_schemas()
        search_path.append(provider="lightning-reshape", path="pkg://lightning_reshape.configs")
