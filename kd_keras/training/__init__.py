"""Running a training: the orchestration of one run (`run`: prepare, data, teachers, views,
model, callbacks, fit, evaluation, export), step checkpoint callbacks and NaN guard
(`callbacks`), pre-emption (`preemption`), the workdir lock (`runlock`), multi-worker
strategies (`distributed`) and their local launcher (`launcher`), precision and XLA choice
(`precision`, `xla_choice`) and teacher caching runs (`cache`). It is the top of the library:
it may import every package below it (`eval` included) but no command-line module.
"""
