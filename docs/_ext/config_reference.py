"""The ``config-reference`` and ``starter-config`` directives: the config reference as text.

Both render, when the docs are built, exactly what the command prints
(``fedjax-lab config --reference`` and ``fedjax-lab config --init NAME``), read from
:func:`fedjax_lab.experiment.reference` and :func:`fedjax_lab.experiment.starter_config`, so the
page cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


class ConfigReference(SphinxDirective):
    """``.. config-reference::`` is the output of ``fedjax-lab config --reference``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from fedjax_lab.experiment import reference

        text = reference()
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


class StarterConfig(SphinxDirective):
    """``.. starter-config:: NAME`` is the output of ``fedjax-lab config --init NAME``."""

    has_content = False
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        from fedjax_lab.experiment import starter_config

        text = starter_config(self.arguments[0])
        block = nodes.literal_block(text, text)
        block["language"] = "toml"
        return [block]


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("config-reference", ConfigReference)
    app.add_directive("starter-config", StarterConfig)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
