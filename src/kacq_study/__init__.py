"""kacq_study: the study behind ``kacq demo``, a consumer of the ``kacq_hooks`` library's public API.

It pretrains a small Llama from scratch while measuring knowledge entropy, then continues training
from several arms (early and late checkpoints, resuscitation, formatting augmentation, SAM) with
fact injection, and checks which of the papers' findings hold (:mod:`kacq_study.findings`), writing
``results.json``, a report and figures (:mod:`kacq_study.report`). The library never imports this
package: ``kacq demo`` reaches it through the ``kacq.commands`` entry point (:func:`kacq_study.cli.register`).

>>> from kacq_study.config import DemoConfig                    # doctest: +SKIP
>>> from kacq_study.study import run_study                     # doctest: +SKIP
>>> results = run_study(DemoConfig.quick(), seeds=(0, 1, 2))    # doctest: +SKIP
"""
