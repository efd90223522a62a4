"""MkDocs hook: render the reST roles of the package's docstrings as plain code.

The docstrings use Sphinx roles (``:class:`Stream```, ``:mod:`._generation```) and ``::``
before literal blocks; mkdocstrings renders them as text. This turns ``:role:<code>x</code>``
into ``<code>x</code>`` and a paragraph-final ``::`` into ``:``.
"""

import re

_ROLE = re.compile(r":(?:class|mod|func|meth|attr|data|exc|obj):(?=<code>)")
_DOUBLE_COLON = re.compile(r"::(?=</p>)")


def on_page_content(html, **kwargs):
    return _DOUBLE_COLON.sub(":", _ROLE.sub("", html))
