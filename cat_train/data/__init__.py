"""What a run learns from: dataset folders, captions and their options, prompts, images and masks.

    dataset.py   kohya-style image folders: captions, triggers, repeats, the dataset plan
    images.py    robust image decoding and aspect buckets
    masks.py     mask files and alpha channels, brought to the bucket and to the latent
    captions.py  caption dropout and tag shuffling on cached conditionings
    prompts.py   triggers as whole words and the preservation prompt y from y_T

Imports nothing else of the method.
"""
