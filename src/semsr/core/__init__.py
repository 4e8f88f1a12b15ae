"""semsr.core: the ground floor every other package builds on.

Errors, paths, image I/O with the one atomic writer, the :class:`~semsr.core.registry.Registry`,
typed method options (:mod:`.options`), the :class:`~semsr.core.method.Method` protocol and its
output (:mod:`.outputs`), the component contract and checkpoint layout (:mod:`.components`),
one dtype/device resolver (:mod:`.dtypes`) and one weights fingerprint (:mod:`.fingerprint`).
Nothing here imports another semsr package.
"""
