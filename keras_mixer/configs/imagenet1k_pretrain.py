"""Pretrain Mixer-B/16 (or L/16) on ImageNet-1k from scratch, as in the paper.

Run:
    python train.py --config imagenet1k_pretrain --set data_dir=/path/to/tfds
    python train.py --config imagenet1k_pretrain --set variant=L/16 data_dir=/path/to/tfds

ImageNet needs a manual download: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/ and run
`tfds build imagenet2012 --data_dir <data_dir>`.

Hardware: the paper used TPU-v3 pods (batch 4096 over 300 epochs, about
94k steps). Expected ImageNet top-1 (paper, ImageNet-1k pretraining at
224): 76.44% for Mixer-B/16 and 71.76% for Mixer-L/16.

Values (the issue's reading of the paper's Table 4 row for each model; the
two rows share them): Adam 0.9/0.999 with weight decay 0.1 (see
`keras_mixer.training` for how that maps to Keras' AdamW), lr 1e-3 with
10k warmup steps then linear decay, clipping at 1, RandAugment (2, 15),
mixup 0.5, stochastic depth 0.1, 300 epochs, batch 4096.
"""


def get_config():
    return dict(
        recipe="pretrain",
        dataset="imagenet2012",
        train_split="train",
        eval_split="validation",
        image_size=224,
        variant="B/16",
        model=dict(stochastic_depth_rate=0.1, dropout_rate=0.0),
        learning_rate=1e-3,
        weight_decay=0.1,
        randaugment_layers=2,
        randaugment_magnitude=15,
        mixup=0.5,
        epochs=300,
        batch_size=4096,
        checkpoint_every=2000,
        seed=0,
    )
