"""Runs in a subprocess of test_distribute.py, on simulated devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
        python tests/distributed_check.py OUT_DIR none data model:2 model:4
    KERAS_BACKEND=tensorflow python tests/distributed_check.py OUT_DIR --tf-cpus 2 none data

For each mode, trains the digits config (a smaller model) for 3 steps through
`training.train` (one step per Keras epoch, so the history holds every
step's loss) and writes `<OUT_DIR>/<mode>.json` with the losses, the
validation accuracies (evaluation batches padded over the replicas), the
placement and the shardings of the model's and optimizer's variables, and
`<OUT_DIR>/<mode>/model.keras`. Device counts must be fixed before the
backend starts, hence the subprocess.
"""

import json
import pathlib
import sys


def main(argv):
    out = pathlib.Path(argv[0])
    modes = argv[1:]
    if modes[0] == "--tf-cpus":
        import tensorflow as tf

        count = int(modes[1])
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
        modes = modes[2:]

    import keras
    import tensorflow as tf
    from keras_mixer import config as config_lib
    from keras_mixer import data, distribute, optim, sources, training

    config = config_lib.load("digits")
    config.update(train_steps=3, steps_per_epoch=1, warmup_fraction=0.0)
    # Two blocks at a quarter of the width: every MLP still splits over 2
    # and 4 model devices. Measured alone, the JAX test took 52 s against
    # 58 s with the digits model, TensorFlow's mirrored one 33 against 41 s:
    # most of the time is XLA compiling about 110 small programs per run.
    config["model"].update(num_blocks=2, hidden_dim=16, tokens_mlp_dim=16, channels_mlp_dim=64)
    for spec in modes:
        mode, _, size = spec.partition(":")
        placement = distribute.setup(mode, int(size) if size else None)
        workdir = out / spec.replace(":", "-")
        result = training.train(config, workdir, verbose=0, distribution=placement)
        log = [line.split(",") for line in (workdir / "log.csv").read_text().splitlines()]
        losses = [float(row[log[0].index("loss")]) for row in log[1:]]
        val_accuracy = [float(row[log[0].index("val_accuracy")]) for row in log[1:]]
        val_loss = [float(row[log[0].index("val_loss")]) for row in log[1:]]
        # An evaluation whose last batch (357 = 11 x 32 + 5) does not split
        # over the replicas.
        (_, _), (x_test, y_test) = sources.load_digits()
        odd = tf.data.Dataset.from_tensor_slices(
            (x_test[:357].astype("float32"), tf.one_hot(y_test[:357], 10))
        ).batch(32)
        with placement.scope():
            model = keras.saving.load_model(workdir / "model.keras", compile=False)
            model.compile(
                loss=optim.make_loss("softmax_xent"),
                weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            )
            odd_eval = model.evaluate(
                data.pad_for_replicas(odd, placement, 32, 357), return_dict=True, verbose=0
            )
        shardings = {}
        if keras.backend.backend() == "jax":
            # Rebuild the trained model in the same scope to read its layouts.
            with placement.scope():
                model = keras.saving.load_model(workdir / "model.keras", compile=False)
                model.compile(optimizer=optim.make_optimizer(1e-3, 3, 0, 0.1, 1.0))
                model.optimizer.build(model.trainable_variables)
            for variable in list(model.variables) + list(model.optimizer.variables):
                spec_ = getattr(variable.value.sharding, "spec", None)
                shardings[variable.path] = [str(a) for a in spec_] if spec_ is not None else None
        (out / f"{spec.replace(':', '-')}.json").write_text(json.dumps({
            "losses": losses, "val_accuracy": val_accuracy, "val_loss": val_loss,
            "odd_eval": odd_eval, "placement": placement.to_dict(),
            "shardings": shardings, "steps": result["steps"],
        }))


if __name__ == "__main__":
    main(sys.argv[1:])
