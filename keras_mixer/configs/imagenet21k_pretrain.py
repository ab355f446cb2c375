"""Pretrain Mixer-B/16 on ImageNet-21k, as in the paper.

Run:
    python train.py --config imagenet21k_pretrain --set data_dir=/path/to/imagenet21k

ImageNet-21k is not in tensorflow-datasets: this reads an image folder,
`<data_dir>/train/<wnid>/*.JPEG` and `<data_dir>/test/<wnid>/...` (a
held-out slice you make; the paper held out 102,400 images). Extensions are
matched case-insensitively.

Hardware: TPU-v3 pods (batch 4096, 300 epochs). Expected: the model then
fine-tunes to 80.64% ImageNet top-1 (B/16) and 82.89% (L/16, with
`--set variant=L/16`), the paper's figures for ImageNet-21k pretraining.

Values: the paper's shared pretraining recipe (Adam 0.9/0.999, 10k warmup
steps then linear decay, batch 4096, clipping at 1, weight decay 0.1) with
lighter regularisation than on ImageNet-1k, since the data is 10x larger:
RandAugment (2, 10), mixup 0.2, stochastic depth 0.1. These three are our
reading of Table 4 and should be checked against it before a full run.
"""


def get_config():
    return dict(
        recipe="pretrain",
        dataset="image_folder",
        data_dir="imagenet21k",
        train_split="train",
        eval_split="test",
        image_size=224,
        variant="B/16",
        model=dict(stochastic_depth_rate=0.1, dropout_rate=0.0),
        learning_rate=1e-3,
        weight_decay=0.1,
        randaugment_layers=2,
        randaugment_magnitude=10,
        mixup=0.2,
        epochs=300,
        batch_size=4096,
        checkpoint_every=2000,
        seed=0,
    )
