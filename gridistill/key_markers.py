"""The markers a params field carries to say how it enters its stage's artifact key.

Light on purpose (no Prefect): option models that the CLI builds before anything heavy is
imported carry them too. :mod:`gridistill.stages` reads them.
"""


class _NotInKey:
    def __repr__(self) -> str:
        return "NotInKey"


NotInKey = _NotInKey()
"""``Annotated`` marker of a params field that is not part of the artifact key."""


class _WeightsInKey:
    def __repr__(self) -> str:
        return "WeightsInKey"


WeightsInKey = _WeightsInKey()
"""``Annotated`` marker of a params field that may name weights on disk (a checkpoint file, a
model directory): the key holds their SHA-256 beside the name, so weights replaced in place
re-key the stages that read them. A value that names nothing on disk (a weights tag, a hub
id) is keyed as it is."""
