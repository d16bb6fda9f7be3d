"""The released X-VLM checkpoints (zengyan-97/X-VLM `README.md`, "Checkpoints"), one row each: the name the official
README gives it, the `xvlm-convert --task` it converts with, the image size it was fine-tuned at (official task YAML
`image_res`) and the result the official README reports for it (its results image `x-vlm-results.png`, the paper's
Tables 2 and 3).

`xvlm-convert --official NAME` records the row in the model card (`convert_checkpoint(official=...)`); docs/weights.md
lists the same rows with the download-to-`push_to_hub` commands.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OFFICIAL_CHECKPOINTS", "OfficialCheckpoint", "official_checkpoint"]

_DRIVE = "https://drive.google.com/"


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One released checkpoint.

    Args:
        name: the id used by `xvlm-convert --official` (the official README's link text, lower-cased, with the
            pre-training data size).
        readme_name: the link text of the official README.
        task: the `xvlm-convert --task` it converts with (also what `xvlm-convert` detects from its keys).
        image_size: the resolution it was trained at (`image_res` of the official YAML), what `--image-size` keeps.
        config: the official task YAML it was trained with (pass it as `--config` for the exact text settings).
        url: the official download link (Google Drive).
        result: the official result (official README image / paper), `""` when the README reports none.
    """

    name: str
    readme_name: str
    task: str
    image_size: int
    config: str
    url: str
    result: str


_4M_TAR = _DRIVE + "file/d/1laNJHBnVGF7onbEYh1vO-b2P5TxdqH-k/view?usp=sharing"

OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    row.name: row
    for row in (
        OfficialCheckpoint(
            "xvlm-4m", "X-VLM (4M, 200K steps)", "pretrain", 224, "configs/Pretrain_XVLM_base_4m.yaml",
            _DRIVE + "file/d/1B3gzyzuDN1DU0lvt2kDz2nTTwSKWqzV5/view?usp=sharing",
            "pre-training only; the fine-tuned 4M results (4m-all-ft-ckpts.tar) start from it",
        ),
        OfficialCheckpoint(
            "xvlm-16m", "X-VLM (16M, 200K steps)", "pretrain", 224, "configs/Pretrain_XVLM_base_16m.yaml",
            _DRIVE + "file/d/1iXgITaSbQ1oGPPvGaV0Hlae4QiJG5gx0/view?usp=sharing",
            "pre-training only; the fine-tuned 16M results start from it",
        ),
        OfficialCheckpoint(
            "retrieval-mscoco-16m", "retrieval-mscoco", "retrieval", 384, "configs/Retrieval_coco.yaml",
            _DRIVE + "drive/folders/1VotCNmdevvtMuJmdxPfg3MOZXJRnV96D?usp=sharing",
            "COCO 5K test: text retrieval R@1/5/10 81.2 / 95.6 / 98.2, image retrieval 63.4 / 85.8 / 91.5",
        ),
        OfficialCheckpoint(
            "retrieval-flickr-16m", "retrieval-flickr", "retrieval", 384, "configs/Retrieval_flickr.yaml",
            _DRIVE + "drive/folders/1lsuBVP7MEqGqWkqRxaxb8N8TbSKqQ1Yz?usp=sharing",
            "Flickr30K 1K test: text retrieval R@1/5/10 97.1 / 100.0 / 100.0, image retrieval 86.9 / 97.3 / 98.7",
        ),
        OfficialCheckpoint(
            "vqa-16m", "vqa", "vqa", 384, "configs/VQA.yaml",
            _DRIVE + "drive/folders/1tRKlCVMvkRquad7kMp4JVEbaKG-Ho8To?usp=sharing",
            "VQA v2: test-dev 78.22, test-std 78.37",
        ),
        OfficialCheckpoint(
            "nlvr2-16m", "nlvr2", "nlvr2", 384, "configs/NLVR.yaml",
            _DRIVE + "drive/folders/19Vz9h0oDRcbinUIcbfh-dsNwtlzrkQiP?usp=sharing",
            "NLVR2: dev 84.41, test-P 84.76",
        ),
        OfficialCheckpoint(
            "refcoco-16m", "refcoco", "grounding", 384, "configs/Grounding_bbox.yaml",
            _DRIVE + "drive/folders/1ySQTjpTm5CeHp50YYFObUjT7DTHLN7DZ?usp=sharing",
            "RefCOCO+ (box supervision) Acc@0.5: val 84.51, testA 89.00, testB 76.91",
        ),
        OfficialCheckpoint(
            "refcoco-weak-16m", "refcoco-weak", "retrieval", 384, "configs/Grounding.yaml",
            _DRIVE + "drive/folders/1wvpsA-VONdDUwQdQITG-V7Kc2CkIkbfM?usp=sharing",
            "",  # weakly supervised RefCOCO+: in the paper, not in the official README's results image
        ),
        OfficialCheckpoint(
            "captioning-coco-16m", "captioning-coco", "captioning", 384, "configs/Captioning.yaml",
            _DRIVE + "drive/folders/15Ymsay477QKo3PWOt9cwjWpiII5RQaH8?usp=sharing",
            "COCO Karpathy test: BLEU@4 39.9, CIDEr 134.0 (cross-entropy); 41.0 / 140.3 after CIDEr optimisation",
        ),
        OfficialCheckpoint(
            "retrieval-mscoco-4m", "4m-all-ft-ckpts.tar (retrieval-mscoco)", "retrieval", 384,
            "configs/Retrieval_coco.yaml", _4M_TAR,
            "COCO 5K test: text retrieval R@1/5/10 80.4 / 95.5 / 98.2, image retrieval 63.1 / 85.7 / 91.6",
        ),
        OfficialCheckpoint(
            "retrieval-flickr-4m", "4m-all-ft-ckpts.tar (retrieval-flickr)", "retrieval", 384,
            "configs/Retrieval_flickr.yaml", _4M_TAR,
            "Flickr30K 1K test: text retrieval R@1/5/10 96.8 / 99.8 / 100.0, image retrieval 86.1 / 97.4 / 98.7",
        ),
        OfficialCheckpoint(
            "vqa-4m", "4m-all-ft-ckpts.tar (vqa)", "vqa", 384, "configs/VQA.yaml", _4M_TAR,
            "VQA v2: test-dev 78.07, test-std 78.09",
        ),
        OfficialCheckpoint(
            "nlvr2-4m", "4m-all-ft-ckpts.tar (nlvr2)", "nlvr2", 384, "configs/NLVR.yaml", _4M_TAR,
            "NLVR2: dev 84.16, test-P 84.21",
        ),
        OfficialCheckpoint(
            "refcoco-4m", "4m-all-ft-ckpts.tar (refcoco)", "grounding", 384, "configs/Grounding_bbox.yaml", _4M_TAR,
            "RefCOCO+ (box supervision) Acc@0.5: val 80.17, testA 86.36, testB 71.00",
        ),
        OfficialCheckpoint(
            "captioning-coco-4m", "4m-all-ft-ckpts.tar (coco_caption)", "captioning", 384, "configs/Captioning.yaml",
            _4M_TAR,
            "COCO Karpathy test: BLEU@4 39.8, CIDEr 133.1 (cross-entropy); 41.3 / 140.8 after CIDEr optimisation",
        ),
    )
}


def official_checkpoint(name: str) -> OfficialCheckpoint:
    """The row of `name` (a key of `OFFICIAL_CHECKPOINTS`); a `KeyError` listing the names otherwise."""
    if name not in OFFICIAL_CHECKPOINTS:
        raise KeyError(f"Unknown official checkpoint {name!r}; known: {', '.join(OFFICIAL_CHECKPOINTS)}.")
    return OFFICIAL_CHECKPOINTS[name]
