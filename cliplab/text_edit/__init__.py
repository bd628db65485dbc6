"""Token-level text-embedding editing and conditioning: one module per paper, built on ``cliplab.tokens``.

The package imports none of its modules eagerly (modules are added independently, and importing one paper's code
must not depend on another's); import the module you use, e.g.::

    from cliplab.text_edit.decor import decor_project, remove_concepts
    from cliplab.text_edit.token_prepending import encode_text_tp

``cliplab.methods.list_methods()`` imports every module here so that each registers its method.
"""

__all__: list[str] = []
