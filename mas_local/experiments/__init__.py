"""Global vs local MAS on a task sequence built from real digits (``mas-local compare``).

The package is the comparison behind ``mas-local compare``; docs/compare.md is the
user's guide. One module per concept, imported in this order (none imports a later one):

``metrics``               accuracy-matrix metrics (average accuracy, BWT, forgetting) and Spearman ρ
``data``                  the digits splits and the task sequences (permuted, split, rotated)
``transformer``           the small ViT-style encoder and its layer types
``models``                the MLP, the CNN and the transformer, the multi-head output, layer names and types
``config``                the settings (:class:`~.config.Config`), the method names, validation
``training``              one task's training loop, accuracy, the penalty's step overhead
``cost``                  the peak extra memory of a call (CUDA peak counter, or the CPU allocator's events)
``importance_agreement``  the four estimators on one model, Spearman ρ per tensor and per layer type, their cost
``report``                aggregation over seeds, the terminal table, the JSON-ready results
``plots``                 the four PNGs
``protocol``              the whole run: seeds, methods, λ selection; :func:`~.protocol.run`

Data
    scikit-learn's handwritten digits (``load_digits``: 1797 real 8×8 scans, bundled
    with scikit-learn, no download). For each seed the images are split once,
    stratified by class, into train / validation / test (60 / 20 / 20 %) and scaled
    by one scalar mean and standard deviation taken from that seed's training split.

Benchmarks (task sequences built from those splits)
    ``permuted``  task ``t`` applies a fixed random pixel permutation (task 1 keeps the
                  original pixel order); one shared 10-way head. Default, 5 tasks.
    ``split``     task ``t`` is the class pair ``(2t, 2t+1)`` with its own 2-way head
                  (multi-head: the task id selects the head at train and test time).
                  At most 5 tasks.
    ``rotated``   task ``t`` rotates every image by an angle evenly spaced in
                  [0°, 90°] (bilinear, zero fill); one shared 10-way head.

Models
    ``mlp``  64 → 256 → 256 → head, ReLU (default; the width is ``models.HIDDEN``).
    ``cnn``  conv 1→16 3×3 → conv 16→32 3×3 stride 2 → linear 512 → 256 → head, ReLU.
    ``transformer``  the 8×8 image cut into 16 patches of 2×2 pixels, a Linear patch embedding
             (4 → 32) and learned positions, 2 pre-LN blocks (4-head softmax attention with
             q/k/v/out Linear layers; MLP 32 → 64 → 32 with GELU), a final LayerNorm, the mean
             over tokens, the head. Trained for 8 epochs per task at lr 3e-3, batch 64
             (``models.TRAINING_DEFAULTS``; the MLP and CNN: 5 epochs, 1e-3, 32).
    The multi-head output of ``split`` is one :class:`~.models.MultiHead` module whose
    forward returns only the active task's two logits while importance is estimated, so
    the importance (global or local) of a head row comes from its own task only.

Methods
    ``finetune``       plain sequential training (the lower bound).
    ``joint``          at task ``t`` trains on the union of the training sets of tasks
                       ``1..t``, continuing from the previous model (the upper bound).
    ``global-sample``  MAS, ``mode="global", estimator="sample"`` (the paper's Ω).
    ``global-batch``   MAS, ``mode="global", estimator="batch"`` (official code, Avalanche).
    ``local-hebbian``  MAS, ``mode="local", estimator="hebbian"`` (ℓ-MAS, forward only).
    ``local-sample``   MAS, ``mode="local", estimator="sample"``.
    Every method starts each seed from the same initial weights, and the first task is
    trained once per seed and shared (all methods do the same thing on it). Each task
    is trained for ``--epochs`` epochs of Adam (the model's lr and batch size, a fresh optimizer
    per task, the same shuffling for every method and λ). After each task a MAS method
    calls ``mas.consolidate`` on that task's training images (labels unused), which
    adds the task's Ω to the running sum (``accumulate="sum"``) and stores θ*.

λ selection (the protocol)
    The MAS object is built with ``lam=1`` and the training loss is
    ``task_loss + λ · mas.penalty()``, so λ scales the penalty exactly as the ``lam``
    argument would. Before each task ``t ≥ 2`` the model is snapshotted; for every λ of
    ``--lam-grid`` the task is trained from that snapshot and scored by the mean
    *validation* accuracy over tasks ``1..t`` (the tasks seen so far; no test data and
    no future task is looked at). The best λ's weights are kept and the sequence goes
    on from them; ties go to the smaller λ. So λ is chosen greedily per task and per
    seed, and ``results.json`` lists the choice for every task and seed together with
    every candidate's validation score. Test accuracies are measured only on the
    kept model. Task 1 has no penalty, so no λ is chosen there.

Metrics (mean ± std over ``--seeds``; std is the population std, ddof 0)
    The accuracy matrix ``R[i, j]`` (test accuracy on task ``j`` after training task
    ``i``), average accuracy after the last task, backward transfer
    ``BWT = mean_j (R[T, j] − R[j, j])`` and forgetting
    ``mean_j max_{l<T} R[l, j] − R[T, j]`` (see :mod:`.metrics`), the seconds
    spent in ``consolidate`` (importance estimation), and the penalty overhead: the
    fastest time of a training step with the penalty over one without, minus one,
    timed by interleaving both on one batch after the last task (for the autograd
    ``mas.penalty()`` and for the fused ``mas.add_penalty_grad_()``).
    Global and local importance are compared on the model after task 1: all four
    estimators are computed with ``compute_importance`` on the task-1 training images
    and compared by Spearman rank correlation per parameter tensor and per layer type
    (all the type's parameters pooled); each estimator's peak extra memory is measured
    there too; the histograms of log10 Ω are plotted.

Outputs in ``--out``: ``results.json`` (every number, the configuration and the
environment), ``accuracy_matrices.png``, ``task1_accuracy.png``,
``importance_global_vs_local.png`` and ``agreement_by_layer_type.png``; a table goes to the terminal.
"""
