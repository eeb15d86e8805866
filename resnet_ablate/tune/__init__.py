"""`ablate tune GRID`: the same hyper-parameter budget for every variant of a grid (Optuna).

An ablation that tunes one arm and not the other proves nothing, so every configuration of the
grid gets its own study with the same number of trials, search space, sampler and pruner, and
``ablate run GRID --tuned`` then trains each cell with its study's best values.

The package, one job a module (this file imports nothing, so the CLI can check a grid's tune
section before the heavy imports):

- ``studies.py``: what a study is: its identity and targets, the tuned grid, and which trial
  is best (the one rule, used by ``ablate tune``, ``run --tuned`` and the report).
- ``budget.py``: samplers, pruners, suggestions, and a study's state against its budget.
- ``trial.py``: the trial worker: ask a trial within the budget, train it through the engine
  (``engine.train_tracked``), tell Optuna how it ended.
- ``grid.py``: the tune of a grid (studies prepared, tuning runs opened, the engine's worker
  pool, tuning runs closed) and ``apply_tuned`` for ``run --tuned``.

How it behaves:

- **One study per configuration, not per cell.** Cells that differ only in their seed share a
  study and its tuned values, so the seeds still measure the spread of one setting. Trials
  train with the configuration's first seed (the grid's first seed). A study is named
  ``tune:<grid>:<key>``; the key hashes what a trial computes: the resolved configuration
  without the tuned fields (their defaults do not matter), with the trial's seed and epochs,
  plus the search space, sampler and pruner. Changing any of those starts new studies; raising
  ``trials`` continues the old ones.
- **Objective: final validation error.** A trial trains the configuration with the suggested
  values for ``tune.epochs`` epochs (default ``train.epochs``; the learning-rate schedule spans
  the trial's epochs) and is scored by ``val_err`` (%) after its last epoch: the error a run
  ends at, not its best epoch, which would favour settings that peak early and then fall back.
  Test images never enter a trial: the trainer's test evaluation is pointed at the validation
  split and nothing it reports under ``test_*`` is logged. A trial that diverges completes with
  100 %, the worst error, so that the sampler learns to avoid its region.
- **Median pruning** (``pruner: median``): after every epoch but the last, a trial whose
  validation error is above the median of the complete trials at that epoch stops as PRUNED.
  It starts once ``max(1, min(5, trials // 4))`` trials are complete. TPE draws its first
  ``max(2, min(10, trials // 3))`` trials at random; samplers are seeded from the study key,
  the trial count and the worker, so one worker on a fresh study repeats itself.
- **Equal budget, exactly.** A study is done when it has ``trials`` finished trials (COMPLETE
  or PRUNED). A worker asks for a trial only while the finished and live running trials are
  fewer than that, and keeps a trial only if fewer than ``trials`` lower-numbered trials are
  finished, waiting or running in a live process (the storage numbers trials atomically); a
  surplus trial is withdrawn (FAIL, ``surplus``) before it trains. Several workers or several
  ``ablate tune`` at once therefore never overshoot. Failed trials do not count; they are run
  again. The best trial (lowest score, earliest on a tie) is chosen among the first ``trials``
  finished ones, so a study tuned further under a larger budget stays comparable.
- **Resumable.** Studies live in the runner's Optuna storage (``results/queue/<grid>.journal``
  or ``--queue``). A running trial carries its host, pid and a heartbeat, as a queued cell does
  (``cellqueue.py``); a rerun fails the trials whose process is gone, marks their MLflow runs
  killed, and continues every study up to its budget. The trial is the unit of resumption: an
  interrupted trial starts again, with new suggested values.
- **MLflow** (logged through ``tracking.py``: Optuna's MLflow callback is deprecated and loses
  parent links). Under the grid's parent run, one *tuning run* per configuration, named
  ``tune <label>``: tags ``ablate.role=tune``, ``ablate.cell_key`` (the study key),
  ``ablate.label``, ``ablate.study``, ``ablate.cells`` (the grid cells it tunes),
  ``ablate.trials_budget``, ``ablate.status``, and after each tune ``ablate.best_trial``,
  ``ablate.best_values`` (JSON), ``ablate.trials_finished``; params ``tune.sampler``,
  ``tune.pruner``, ``tune.epochs``, ``tune.seed``, ``tune.metric``, ``tune.space.<field>`` and
  the configuration's fields; metric ``best_val_err``. Under it, one run per trial, named
  ``<label> trial <n>``: tags ``ablate.role=trial``, ``ablate.trial`` (its number),
  ``ablate.cell_key``, ``ablate.study``, ``ablate.suggested`` (JSON of the suggested values),
  ``ablate.status`` (running, complete, pruned, diverged, failed, killed), ``ablate.reason``;
  every config field as a param; per epoch ``train_loss``, ``train_err``, ``val_loss``,
  ``val_err``, ``lr``, ``epoch_seconds``, ``images_per_second``; at the end ``objective`` (the
  score Optuna was given; complete and diverged trials) and ``final_val_err``.

Tuned cells (``tuned_grid``) keep their labels with ``settings=tuned`` added (their name's
``tuned`` field), so that default and tuned runs of a cell tell themselves apart in the MLflow
UI and the report.
"""
