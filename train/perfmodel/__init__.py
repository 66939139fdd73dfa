"""``python -m train.perfmodel``: a roofline prediction of one training step (time by component,
bound, MFU, memory per GPU, speedup over BF16) for a model x parallelism x recipe on an
accelerator from ``conf/hardware/``. The CLI is ``train.perfmodel.__main__``; the formulas are
``train.perfmodel.roofline``, the step's components ``train.perfmodel.step``, the whole step
``train.perfmodel.predict``.
"""
