"""The application on top of the snl_fx library: what runs jobs, not what a model needs.

* ``cli``: the ``relu-count`` and ``snl-fx`` commands (``_spec``: their model specs and shapes);
* ``jobs``: end-to-end runs shared by the CLI, the demo and the benchmarks (data sets and models
  by name, cached pretraining, a run's output files);
* ``data``: image data sets from local files and their registry, ``DATASETS``;
* ``models``: the model zoo (CIFAR ResNets, WRN-22-8, the small ResNet of the demo), ``MODELS``;
* ``plots``: ReLUs per layer, accuracy against ReLUs, the gate path;
* ``pi``: the PI backends' runners behind ``pi_bench`` (CrypTen here; SPU's main-venv side in
  ``_spu``, and ``_spu_runner.py``, the script ``.venv-spu`` runs).

The library (``snl_fx`` itself: life cycle, phases, inspector, export, cost model) never imports
this package, except on use for the names it documents: ``snl_fx.pi_bench``,
``snl_fx.PiBenchResult`` and the modules above as ``snl_fx.<name>`` (so the spec
``snl_fx.models:cifar_resnet18`` still names the zoo). ``tests/test_layering.py`` holds this.
"""
