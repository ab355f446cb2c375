"""Fine-tune an ImageNet-21k Mixer-B/16 on CIFAR-10 at 224x224 (the official recipe).

Run:
    python train.py --config cifar10_finetune --set data_dir=/path/to/tfds

The checkpoint is the official file
https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz,
downloaded once into ~/.keras/mixer_models (or pass a local copy with
`--set init_checkpoint=/path/to/Mixer-B_16.npz`, or set KERAS_MIXER_MIRROR);
CIFAR-10 comes from tensorflow-datasets (`tfds build cifar10`, or add
`download=True`). Hardware: the batch plan keeps the batch of 512 and
accumulates gradients where it does not fit (4 steps of 128 in bfloat16 on
Colab's v5e chip, 2 of 256 on a v6e chip; docs/distributed.md). Expected: 96.82% test accuracy (the official
vit_jax code's figure for Mixer-B/16 from ImageNet-21k) after 10k steps.

Recipe "finetune": SGD momentum 0.9, cosine decay after 500 warmup steps,
clipping at global norm 1, no weight decay, a fresh zero head. CIFAR's
32x32 images are upsampled: train crops keep 70-100% of the area (the
official pipeline resizes to 256 and crops 224, about 77%), and eval is the
paper's resize-to-256-then-center-224.
"""


def get_config():
    return dict(
        recipe="finetune",
        dataset="cifar10",
        train_split="train",
        eval_split="test",
        image_size=224,
        crop_area=[0.7, 1.0],
        eval_crop="resize-crop",
        variant="B/16",
        init_checkpoint="imagenet21k/Mixer-B_16",
        learning_rate=0.03,
        train_steps=10_000,
        steps_per_epoch=500,
        batch_size=512,
        checkpoint_every=500,
        seed=0,
    )
