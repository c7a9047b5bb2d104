"""GPT4Scene: unmodified Qwen2-VL fed N egocentric frames plus one bird's-eye-view (BEV) image.

GPT4Scene (Qi-Zhangyang/GPT4Scene-and-VLN-R1, LLaMA-Factory based) fully
fine-tunes Qwen2-VL-7B-Instruct on 32 frames + 1 BEV map with object-ID
markers, every image resized so its longer side is <= 512 px
(``--image_resolution 512``). The model is HF ``Qwen2VLForConditionalGeneration``
as is; the vopt adapter ``qwen2_vl`` splits it into ``visual`` (the varlen ViT:
does not export, runs eagerly) and ``language_model`` (Qwen2 with M-RoPE).

Inputs here: the frames as one video (``pixel_values_videos`` +
``video_grid_thw``), the BEV as one image (``pixel_values`` +
``image_grid_thw``), each wrapped in vision start/end ids, and
``mm_token_type_ids`` (0 text, 1 image, 2 video), which Qwen2-VL needs for its
3-D positions. Each frame is one temporal patch (the frame repeated along the
temporal patch axis, as Qwen2-VL's processor does for a still image; the
original feeds the frames as 32 images), so the LLM sees the same
252 tokens per frame as the paper's setup.

Full (models.md §1; ``Qwen/Qwen2-VL-7B-Instruct`` config): ViT 32 layers, 1280
wide, 16 heads (head dim 80), MLP ratio 4, patch 14, temporal patch 2, 2x2
merger -> 3584; Qwen2-7B LLM 28 layers, 3584 wide, 28 heads / 4 KV, MLP 18944,
vocab 152064, rope theta 1e6, mrope_section [16, 24, 24]. Frame 392x504 px
(ScanNet 968x1296 scaled to a 512 longer side = 382x512, then rounded to
multiples of 28): 28x36 patches -> 14x18 = 252 tokens per frame; BEV 504x504
-> 324 tokens; 32 frames -> 8064 + 324 = 8388 visual tokens (the sizes are an
ASSUMPTION matching the spec's unverified ~252 / ~324). Tiny (models.md §3):
ViT depth 2 / embed 32 (patch 4), Qwen2 64 wide / 2 layers / 2 KV heads,
mrope [2, 3, 3]; frame 16x24 px -> 6 tokens, BEV 24x24 -> 9 tokens; 8 frames.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import LLMDims, StageCall, ZooEntry, ZooModel, register
from ._inputs import PROMPT_TEXT_TOKENS, check_positive

DEFAULT_FRAMES = {"tiny": 8, "full": 32}
# (height, width) in pixels of one frame and of the BEV image (see the module docstring).
FRAME_HW = {"tiny": (16, 24), "full": (392, 504)}
BEV_HW = {"tiny": (24, 24), "full": (504, 504)}
SPECIAL_TOKENS = 4                # vision start + end around the video and around the BEV image

TINY_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                   temporal_patch_size=2, mlp_ratio=2)
TINY_IDS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)

# Qwen/Qwen2-VL-7B-Instruct config.json.
FULL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=32768,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
FULL_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, mlp_ratio=4)
FULL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def config(size: str):
    import transformers as T

    tiny = size == "tiny"
    return T.Qwen2VLConfig(text_config=dict(TINY_TEXT if tiny else FULL_TEXT), vision_config=dict(TINY_VISION if tiny else FULL_VISION),
                           tie_word_embeddings=False, **(TINY_IDS if tiny else FULL_IDS))


def patch_grid(hw: tuple, vision_cfg) -> tuple:
    """``(h, w)`` patches of an image of ``hw`` pixels (sides must be multiples of patch x merge)."""
    unit = vision_cfg.patch_size * vision_cfg.spatial_merge_size
    if hw[0] % unit or hw[1] % unit:
        raise ValueError(f"image size {hw} must be a multiple of patch_size x spatial_merge_size = {unit}")
    return hw[0] // vision_cfg.patch_size, hw[1] // vision_cfg.patch_size


class VarlenVisionFlops(nn.Module):
    """FLOP-equivalent stand-in for the Qwen2-VL ViT on fake tensors (cost accounting only).

    The ViT's attention splits its packed sequence at ``cu_seqlens`` with
    ``.tolist()``, which fake tensors cannot answer. Every attention sequence
    here is one temporal patch of equal length within a group (the frames; the
    BEV), so this runs the tower's own submodules with the varlen attention as
    one batched SDPA per group: the same matmul shapes, hence the same FLOPs.
    The rotary position rotation is skipped (elementwise: no matmul FLOPs), so
    the outputs are not the ViT's; ``forward(*patches)`` takes one packed
    ``[n_seqs * seq_len, patch_dim]`` tensor per ``groups`` entry.
    """

    def __init__(self, visual: nn.Module, groups: list):
        super().__init__()
        self.visual = visual
        self.groups = list(groups)  # [(n_seqs, seq_len)] per input tensor

    def forward(self, *patches: torch.Tensor) -> list:
        outs = []
        for x, (n, length) in zip(patches, self.groups):
            h = self.visual.patch_embed(x)
            for blk in self.visual.blocks:
                attn = blk.attn
                qkv = attn.qkv(blk.norm1(h)).reshape(n, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
                o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
                h = h + attn.proj(o.transpose(1, 2).reshape(n * length, -1))
                h = h + blk.mlp(blk.norm2(h))
            outs.append(self.visual.merger(h))
        return outs


def build(size: str, device: torch.device, dtype: torch.dtype) -> ZooModel:
    import transformers as T

    cfg = config(size)
    vc, tc = cfg.vision_config, cfg.text_config
    with torch.device(device):
        model = T.Qwen2VLForConditionalGeneration(cfg).to(dtype)
    frame_grid, bev_grid = patch_grid(FRAME_HW[size], vc), patch_grid(BEV_HW[size], vc)
    merge = vc.spatial_merge_size ** 2
    per_frame, bev_tokens = frame_grid[0] * frame_grid[1] // merge, bev_grid[0] * bev_grid[1] // merge
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2

    def visual_tokens(frames: int) -> int:
        return frames * per_frame + bev_tokens

    def example_inputs(batch: int = 1, frames: int = DEFAULT_FRAMES[size], seed: int = 0) -> dict:
        check_positive(batch=batch, frames=frames)
        gen = torch.Generator().manual_seed(seed)
        half = PROMPT_TEXT_TOKENS // 3
        text = torch.randint(1, min(cfg.vision_start_token_id, tc.vocab_size - 16), (batch, PROMPT_TEXT_TOKENS), generator=gen)
        col = lambda tok, n: torch.full((batch, n), tok, dtype=torch.long)
        start, end = col(cfg.vision_start_token_id, 1), col(cfg.vision_end_token_id, 1)
        ids = torch.cat([text[:, :half], start, col(cfg.video_token_id, frames * per_frame), end, text[:, half:2 * half],
                         start, col(cfg.image_token_id, bev_tokens), end, text[:, 2 * half:]], dim=1)
        types = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
        video = torch.randn(batch * frames * frame_grid[0] * frame_grid[1], patch_dim, generator=gen)
        bev = torch.randn(batch * bev_grid[0] * bev_grid[1], patch_dim, generator=gen)
        grid = lambda t, g: torch.tensor([[t, *g]] * batch, dtype=torch.long, device=device)
        return {"input_ids": ids.to(device), "mm_token_type_ids": types.to(device),
                "pixel_values_videos": video.to(device=device, dtype=dtype), "video_grid_thw": grid(frames, frame_grid),
                "pixel_values": bev.to(device=device, dtype=dtype), "image_grid_thw": grid(1, bev_grid)}

    def stage_calls(batch: int, frames: int) -> list:
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        seq = visual_tokens(frames) + PROMPT_TEXT_TOKENS + SPECIAL_TOKENS
        n_frame, n_bev = frame_grid[0] * frame_grid[1], bev_grid[0] * bev_grid[1]
        vision = VarlenVisionFlops(model.model.visual, [(batch * frames, n_frame), (batch, n_bev)])
        return [
            StageCall("visual", vision, (new(batch * frames * n_frame, patch_dim), new(batch * n_bev, patch_dim))),
            StageCall("language_model", model.model.language_model,
                      kwargs={"inputs_embeds": new(batch, seq, tc.hidden_size),
                              "position_ids": torch.empty(3, batch, seq, device=device, dtype=torch.long), "use_cache": False}),
            StageCall("lm_head", model.lm_head, (new(batch, 1, tc.hidden_size),)),  # generation keeps the last position
        ]

    return ZooModel("gpt4scene", size, model, example_inputs, DEFAULT_FRAMES[size], generates=True,
                    llm=LLMDims.from_hf(tc), visual_tokens=visual_tokens, stage_calls=stage_calls)


register(ZooEntry(
    name="gpt4scene",
    paper="GPT4Scene: Understand 3D Scenes from Videos with Vision-Language Models",
    backbone="Qwen2-VL-7B (ViT 675M + Qwen2-7B, M-RoPE), 32 frames + 1 BEV image",
    stages=("visual", "language_model"),
    passes=("canonicalize_attention", "sdpa", "sageattention2", "vidkv", "holitom"),
    build=build,
    notes=("Unmodified Qwen2VLForConditionalGeneration. The ViT (varlen attention, data-dependent cu_seqlens) does not "
           "export and runs eagerly; the LLM is captured. Frames enter as one video, one temporal patch per frame "
           "(the original feeds 32 images: same token count, different temporal M-RoPE ids). ASSUMED sizes: frame "
           "392x504 px -> 252 tokens, BEV 504x504 -> 324 tokens (spec: ~252 / ~324, unverified). Vision FLOPs are "
           "counted on a FLOP-equivalent batched stand-in (VarlenVisionFlops). HoliTom must use the 3-D M-RoPE "
           "positions, leave the BEV image out of temporal merging and keep the object-ID markers."),
))
