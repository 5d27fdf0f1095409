"""The compile-friendly model pieces: SAM2's image encoder and its prompt encoder + mask decoder
for many single-point prompts, each as one module with tensors in and out, so that they can run
eagerly, be compiled or be exported. Nothing here knows of mask generation (amg.py) or of
how to compile (fast.py); only whether code is being compiled for a GPU, where a few steps take
the forms Inductor fuses (fusion_forms), the same numbers.

- `ImageEncoder`: model input (B, 3, R, R) -> (image_embed, feat_s0, feat_s1), as sam2's
  SAM2ImagePredictor.set_image; `split_features` makes one `ImageFeatures` per image.
- The point decoders, one interface, `(image_embed, feat_s0, feat_s1, coords (P, 2)) ->
  (low-resolution mask logits (P, M, h, w), predicted IoUs (P, M))`:
  - `PointDecoder`: sam2's own modules called as sam2's SAM2ImagePredictor calls them: the
    reference.
  - `FactoredPointDecoder`: the same weights and the same function, reorganised for many
    prompts.

sam2's decoder copies the image embedding once per prompt and runs every image-side projection
of its two-way transformer on each copy: on a CPU most of its time goes into adding and copying
those (P, 4096, 256) tensors. The factored decoder removes that work with exact algebra:
- the first layer's image side (keys and values for the tokens, queries for the image) does not
  depend on the prompt: projected once per call, shared by every prompt;
- attention from a prompt's few tokens to the image never projects the image: the token's query
  is carried through the key projection (q . Wk x = (Wk^T q) . x), the softmax-weighted sum of
  image tokens is taken before the value projection (the weights sum to one), and a constant
  bias term drops out of the softmax;
- attention from the image to the tokens never projects the image either (Wq^T k per token), and
  its output projection is folded into the tokens' values, so each image token gets a weighted
  sum of 8 heads x n tokens rows;
- the mask upscaling (two 2x2 stride-2 transposed convolutions) runs as matrix products in a
  channels-last layout, with the high-resolution features and biases added inside the products,
  and only the mask tokens that are returned get a mask.
The results equal sam2's up to float rounding (tests/test_decoder.py compares them). Compiled
for a GPU, a few steps take forms that Inductor fuses into fewer passes over the (P, 4096, 256)
tensors (`fusion_forms`); the same function, compared compiled on a CPU in the tests.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base
from sam2.modeling.sam.transformer import Attention


@dataclass(frozen=True)
class ImageFeatures:
    """What the image encoder gives the mask decoder, for one image."""

    image_embed: torch.Tensor  # (1, C, H/16, W/16)
    high_res_feats: list[torch.Tensor]  # [(1, C/8, H/4, W/4), (1, C/4, H/8, W/8)]

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in [self.image_embed, *self.high_res_feats])


class ImageEncoder(torch.nn.Module):
    """Model input (B, 3, R, R) -> what the mask decoder needs: (image_embed, feat_s0, feat_s1).

    As sam2's SAM2ImagePredictor.set_image, as one module with tensors in and out.
    """

    def __init__(self, model: SAM2Base) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone_out = self.model.forward_image(images)
        _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            # Added to the lowest-resolution features during training on videos.
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        # (H*W, B, C) -> (B, C, H, W), in the input's dtype (sam2's neck upcasts some levels
        # to float32 in half-precision modes; a no-op in float32)
        feat_s0, feat_s1, image_embed = [
            feat.permute(1, 2, 0).reshape(images.shape[0], -1, h, w).to(images.dtype)
            for feat, (h, w) in zip(vision_feats, feat_sizes)
        ]
        return image_embed, feat_s0, feat_s1


def split_features(encoder_output: tuple[torch.Tensor, ...]) -> list[ImageFeatures]:
    """The encoder's (image_embed, feat_s0, feat_s1) for a batch -> one ImageFeatures per image."""
    image_embed, feat_s0, feat_s1 = encoder_output
    return [
        ImageFeatures(image_embed=image_embed[i : i + 1], high_res_feats=[feat_s0[i : i + 1], feat_s1[i : i + 1]])
        for i in range(len(image_embed))
    ]


def model_coords(points: torch.Tensor, image_hw: tuple[int, int], image_size: int) -> torch.Tensor:
    """Pixels (P, 2) of an image of image_hw -> [0, 1] -> the model's input frame, as
    SAM2Transforms.transform_coords."""
    h, w = image_hw
    return points / torch.tensor([w, h], dtype=torch.float32, device=points.device) * image_size


def point_prompt_embeddings(
    prompt_encoder: torch.nn.Module, coords: torch.Tensor, mask_logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's prompt encoder on one foreground point per prompt: coords (P, 2) in the model's
    input frame, and optionally a mask input per prompt (P, h, w) -> (sparse (P, 2, C), dense)."""
    labels = torch.ones((coords.shape[0], 1), dtype=torch.int, device=coords.device)
    masks = None if mask_logits is None else mask_logits[:, None]
    return prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=masks)


def decode_points(
    model: SAM2Base,
    image_embed: torch.Tensor,
    high_res_feats: list[torch.Tensor],
    coords: torch.Tensor,
    multimask_output: bool,
    mask_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's prompt encoder + mask decoder on one foreground point per prompt (and optionally a
    mask input each), as SAM2ImagePredictor._predict calls them: (logits (P, M, h, w), IoUs (P, M))."""
    sparse, dense = point_prompt_embeddings(model.sam_prompt_encoder, coords, mask_logits)
    # The prompt encoder stays in float32 in half-precision modes (its Fourier features need the
    # precision); its outputs take the decoder's dtype. No-op in float32.
    dtype = image_embed.dtype
    low_res_logits, iou_preds, _, _ = model.sam_mask_decoder(
        image_embeddings=image_embed,
        image_pe=model.sam_prompt_encoder.get_dense_pe().to(dtype),
        sparse_prompt_embeddings=sparse.to(dtype),
        dense_prompt_embeddings=dense.to(dtype),
        multimask_output=multimask_output,
        repeat_image=coords.shape[0] > 1,
        high_res_features=high_res_feats,
    )
    return low_res_logits, iou_preds


class PointDecoder(torch.nn.Module):
    """Prompt encoder + mask decoder for single foreground points on one image, as sam2's
    SAM2ImagePredictor._predict: the reference. One module, so that it can be compiled or
    exported."""

    def __init__(self, model: SAM2Base, multimask_output: bool) -> None:
        super().__init__()
        self.model = model
        self.multimask_output = multimask_output

    def forward(
        self, image_embed: torch.Tensor, feat_s0: torch.Tensor, feat_s1: torch.Tensor, coords: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_points(self.model, image_embed, [feat_s0, feat_s1], coords, self.multimask_output)


def refine_with_mask_input(
    model: SAM2Base, features: ImageFeatures, coords: torch.Tensor, mask_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's decoder on one foreground point and one mask input per prompt, a single mask out,
    as sam2's generator refines masks (use_m2m): coords (P, 2) in the model's input frame, mask
    logits (P, h, w) -> (logits (P, h, w), IoUs (P,))."""
    low_res_logits, iou_preds = decode_points(
        model, features.image_embed, features.high_res_feats, coords, multimask_output=False, mask_logits=mask_logits
    )
    return low_res_logits[:, 0].float(), iou_preds[:, 0].float()


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(P, n, heads * d) -> (P, heads, n, d)"""
    p, n, c = x.shape
    return x.reshape(p, n, heads, c // heads).transpose(1, 2)


def tokens_to_image(
    attn: Attention, queries: torch.Tensor, image: torch.Tensor, image_with_pe: torch.Tensor
) -> torch.Tensor:
    """attn(q=queries, k=image_with_pe, v=image) for per-prompt image tokens, without
    projecting them.

    queries: (P, n, C) tokens with their positional embedding added; image: (P, N, C);
    image_with_pe: (P, N, C) image + its positional embedding. Returns (P, n, C).
    """
    p, n, _ = queries.shape
    heads, d = attn.num_heads, attn.internal_dim // attn.num_heads
    q = split_heads(attn.q_proj(queries), heads)  # (P, h, n, d)
    # q . (Wk x + bk) = (Wk^T q) . x + q . bk; the second term is the same for every image token
    # and drops out of the softmax.
    k_weight = attn.k_proj.weight.reshape(heads, d, -1)  # (h, d, C)
    q_in_image = torch.matmul(q, k_weight).reshape(p, heads * n, -1) / math.sqrt(d)  # (P, h*n, C)
    weights = torch.bmm(q_in_image, image_with_pe.transpose(1, 2)).softmax(dim=-1)  # (P, h*n, N)
    # Weights sum to one: the weighted sum of projected values is the projection of the
    # weighted sum.
    mixed = torch.bmm(weights, image).reshape(p, heads, n, -1)  # (P, h, n, C)
    v_weight = attn.v_proj.weight.reshape(heads, d, -1)  # (h, d, C)
    values = torch.matmul(mixed, v_weight.transpose(1, 2)) + attn.v_proj.bias.reshape(heads, 1, d)
    return attn.out_proj(values.transpose(1, 2).reshape(p, n, heads * d))


def shared_tokens_to_image(
    attn: Attention, queries: torch.Tensor, image_keys: torch.Tensor, image_values: torch.Tensor
) -> torch.Tensor:
    """attn(q=queries, k, v) against image keys and values (N, C') shared by every prompt: all
    prompts' tokens as one sequence of queries."""
    p, n, _ = queries.shape
    heads = attn.num_heads
    q = attn.q_proj(queries).reshape(1, p * n, -1)
    k, v = image_keys[None], image_values[None]
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return attn.out_proj(out.transpose(1, 2).reshape(p, n, -1))


# Devices where compiled (or exported) code takes the forms written for Inductor's fusion on a
# GPU (fusion_forms): sums after products (product_plus), the masks' read-out as a reduction
# (FactoredPointDecoder.mask_logits). On the CPU the eager forms, compiled, stayed faster (tiny,
# bfloat16: 175 ms against 185 to 205 ms per decoder call with sums after products).
FUSION_FORMS_WHEN_COMPILED = {"cuda"}


def fusion_forms(device: torch.device) -> bool:
    """Whether code being compiled (or exported) for `device` takes the fusion forms."""
    return torch.compiler.is_compiling() and device.type in FUSION_FORMS_WHEN_COMPILED


def product_plus(start: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """start + a @ b for a (P, m, k) and b (P, k, n) or (k, n), shared; start broadcast to
    (P, m, n). One baddbmm, the product starting from `start` (one pass over the sum fewer),
    except in the fusion forms: a product and an add, which Inductor fuses into the kernel that
    reads the sum next (layer norm, GELU, softmax), where a compiled baddbmm first copies its
    broadcast start into its output, 2 to 4 GB per call at 1024 prompts in float16 (on an H200,
    such plain copies took 7.4 ms of the 40 ms decoder)."""
    if fusion_forms(a.device):
        return torch.matmul(a, b) + start
    return torch.baddbmm(start, a, b if b.dim() == 3 else b.expand(a.shape[0], -1, -1))


def image_to_tokens_update(
    attn: Attention,
    norm: torch.nn.LayerNorm,
    image: torch.Tensor,
    image_queries: torch.Tensor,
    token_keys: torch.Tensor,
    token_values: torch.Tensor,
) -> torch.Tensor:
    """norm(image + attn(q=image_queries, k=token_keys, v=token_values)), the image side of a
    two-way block, with the output projection folded into the tokens' values.

    image: (N, C) shared by every prompt, or (P, N, C), which is updated in place where no gradient
    is recorded (the caller does not need it after: one copy of (P, N, C) less per step);
    image_queries: either (N, C') already projected (shared by every prompt) or (P, N, C) image +
    positional embedding, then projected through the tokens' keys instead; token_keys,
    token_values: (P, n, C). Returns (P, N, C).
    """
    p, n, _ = token_keys.shape
    heads, d = attn.num_heads, attn.internal_dim // attn.num_heads
    keys = split_heads(attn.k_proj(token_keys), heads) / math.sqrt(d)  # (P, h, n, d), scaled
    # Scores are laid out (P, token, head, N): the softmax over a prompt's few tokens then runs
    # across rows N long, which a CPU vectorises (along an axis of 8 tokens it was 5x slower).
    if image_queries.dim() == 2:  # projected queries shared by every prompt
        q = image_queries.reshape(-1, heads, d)  # (N, h, d)
        scores = torch.einsum("phjd,Nhd->pjhN", keys, q)
    else:  # (x Wq^T + bq) . k = x . (Wq^T k) + bq . k
        q_weight = attn.q_proj.weight.reshape(heads, d, -1)  # (h, d, C)
        k_in_image = torch.einsum("hdc,phjd->pjhc", q_weight, keys).reshape(p, n * heads, -1)
        k_bias = torch.einsum("hd,phjd->pjh", attn.q_proj.bias.reshape(heads, d), keys).reshape(p, n * heads, 1)
        scores = product_plus(k_bias, k_in_image, image_queries.transpose(1, 2)).reshape(p, n, heads, -1)
    weights = scores.softmax(dim=1).reshape(p, n * heads, -1)  # (P, n*h, N)
    # Each head's values through its slice of the output projection: one row per (token, head).
    values = split_heads(attn.v_proj(token_values), heads)  # (P, h, n, d)
    out_weight = attn.out_proj.weight.reshape(-1, heads, d)  # (C, h, d)
    # The output bias is spread over each head's rows: each head's weights sum to one.
    rows = torch.einsum("phjd,chd->pjhc", values, out_weight) + attn.out_proj.bias / heads
    weights, rows = weights.transpose(1, 2), rows.reshape(p, n * heads, -1)
    if image.dim() == 3 and not torch.is_grad_enabled() and not fusion_forms(image.device):
        updated = image.baddbmm_(weights, rows)
    else:
        updated = product_plus(image, weights, rows)
    return F.layer_norm(updated, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def to_channels_last_blocks(feat: torch.Tensor, levels: int) -> torch.Tensor:
    """(C, H * 2^levels, W * 2^levels) -> (H * W * 4^levels, C), rows in the order the
    stride-2 transposed convolutions produce pixels: token (y, x), then each level's (a, b)."""
    c, height, width = feat.shape
    h, w = height >> levels, width >> levels
    # rows are y, a1, a2, ...; columns x, b1, b2, ...
    blocks = feat.reshape(c, h, *[2] * levels, w, *[2] * levels)
    order = [1, levels + 2] + [i for level in range(levels) for i in (2 + level, levels + 3 + level)] + [0]
    return blocks.permute(order).reshape(-1, c)


def upscaled_rows_in_image_order(h: int, w: int) -> torch.Tensor:
    """The upscaling's output rows (token (y, x), then each level's (a, b)) of the 4h x 4w
    low-resolution mask pixels, in image order: rows (y, a1, a2), columns (x, b1, b2)."""
    rows = torch.arange(16 * h * w).reshape(h, w, 2, 2, 2, 2)  # (y, x, a1, b1, a2, b2)
    return rows.permute(0, 2, 4, 1, 3, 5).reshape(-1)


def transposed_conv_as_matrix(conv: torch.nn.ConvTranspose2d) -> torch.Tensor:
    """2x2 stride-2 transposed convolution weight (C_in, C_out, 2, 2) -> (C_in, [a, b, C_out])."""
    c_in, c_out, _, _ = conv.weight.shape
    return conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)


class ImageSide(NamedTuple):
    """What every prompt on one image shares, computed once per call."""

    tokens: torch.Tensor  # (N, C) image embedding + dense prompt embedding (no mask input)
    pe: torch.Tensor  # (N, C) their positional embedding
    first_keys: torch.Tensor  # (N, C') first layer, tokens-to-image keys
    first_values: torch.Tensor  # (N, C') first layer, tokens-to-image values
    first_queries: torch.Tensor  # (N, C') first layer, image-to-tokens queries
    upscale_base1: torch.Tensor  # (N, 4 C/4) first transposed convolution's bias + feat_s1
    upscale_base2: torch.Tensor  # (4 N, 4 C/8) second one's bias + feat_s0


# On a CPU, the image tokens in one step of FactoredPointDecoder, in bytes of one channel: steps
# of 4 prompts on a 1024-pixel model's 4096 float32 tokens keep each step's tensors in cache
# (measured fastest on the 2-core machine); in bfloat16 the same bytes hold 8 prompts (4% faster
# than 4 on the Intel machine of docs/performance.md).
CPU_STEP_BYTES = 16384 * 4


def default_prompts_per_step(model: SAM2Base) -> int | None:
    """Prompts per step of FactoredPointDecoder for the model's device, size and dtype: on a CPU,
    few enough that a step's tensors stay in cache; a GPU takes them all at once."""
    if model.device.type != "cpu":
        return None
    h, w = model.sam_prompt_encoder.image_embedding_size
    number_bytes = next(model.sam_mask_decoder.parameters()).element_size()
    return max(1, CPU_STEP_BYTES // (h * w * number_bytes))


class FactoredPointDecoder(PointDecoder):
    """PointDecoder's function for many prompts at once with the per-prompt image work removed
    (see the module's docstring). Same weights (it reads the model's own modules); results equal
    to float rounding.

    prompts_per_step: prompts run together after the shared image side (None: all at once).
    iou_gate (multimask output only): prompts whose every predicted IoU is at most this get no
    mask computed; their logits are sam2's NO_OBJ_SCORE (empty masks). The mask generator drops
    those masks by the same threshold before it looks at their logits.
    Built for the model as it is (its device, its prompt encoder's weights): build another after
    moving the model or loading other weights.
    """

    def __init__(
        self,
        model: SAM2Base,
        multimask_output: bool,
        prompts_per_step: int | None = None,
        iou_gate: float | None = None,
    ) -> None:
        super().__init__(model, multimask_output)
        if iou_gate is not None and not multimask_output:
            raise ValueError("iou_gate needs multimask output (single-mask selection reads every mask)")
        self.prompts_per_step = prompts_per_step
        self.iou_gate = iou_gate
        h, w = model.sam_prompt_encoder.image_embedding_size
        self.register_buffer("image_order", upscaled_rows_in_image_order(h, w).to(model.device), persistent=False)
        # The image tokens' positional embedding (N, C), float32, computed once: in a compiled
        # decoder its sines and cosines were fused into the layer norms over every prompt's
        # image tokens (an H200's profile names sin and cos in those kernels).
        with torch.no_grad():
            pe = model.sam_prompt_encoder.get_dense_pe()[0].flatten(1).t().contiguous()
        self.register_buffer("dense_pe", pe, persistent=False)

    def forward(
        self, image_embed: torch.Tensor, feat_s0: torch.Tensor, feat_s1: torch.Tensor, coords: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        side = self.image_side(image_embed, feat_s0, feat_s1)
        step = self.prompts_per_step or len(coords)
        steps = [self.predict(side, coords[start : start + step]) for start in range(0, len(coords), step)]
        logits, iou_preds = zip(*steps)
        return torch.cat(logits), torch.cat(iou_preds)

    def image_side(self, image_embed: torch.Tensor, feat_s0: torch.Tensor, feat_s1: torch.Tensor) -> ImageSide:
        prompt_encoder, decoder = self.model.sam_prompt_encoder, self.model.sam_mask_decoder
        dtype = image_embed.dtype
        tokens = image_embed[0].flatten(1).t() + prompt_encoder.no_mask_embed.weight.to(dtype)
        pe = self.dense_pe.to(dtype)
        first = decoder.transformer.layers[0]
        conv1, _, _, conv2, _ = decoder.output_upscaling
        base1, base2 = conv1.bias.repeat(4), conv2.bias.repeat(4)  # columns (a, b, channel)
        if decoder.use_high_res_features:
            n = tokens.shape[0]
            base1 = to_channels_last_blocks(feat_s1[0], 1).reshape(n, -1) + base1
            base2 = to_channels_last_blocks(feat_s0[0], 2).reshape(4 * n, -1) + base2
        return ImageSide(
            tokens=tokens,
            pe=pe,
            first_keys=first.cross_attn_token_to_image.k_proj(tokens + pe),
            first_values=first.cross_attn_token_to_image.v_proj(tokens),
            first_queries=first.cross_attn_image_to_token.q_proj(tokens + pe),
            upscale_base1=base1,
            upscale_base2=base2,
        )

    def predict(self, side: ImageSide, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of prompts: (logits (P, M, 4h, 4w), predicted IoUs (P, M))."""
        tokens, image = self.transform(side, coords)
        iou_preds, mask_tokens = self.heads(tokens)
        if self.iou_gate is not None:
            passing = (iou_preds > self.iou_gate).any(dim=1).nonzero()[:, 0]
            if len(passing) < len(coords):
                logits = mask_tokens.new_full((*iou_preds.shape, *self.mask_size), NO_OBJ_SCORE)
                if len(passing):
                    logits[passing] = self.mask_logits(side, image[passing], mask_tokens[passing])
                return logits, iou_preds
        logits = self.mask_logits(side, image, mask_tokens)
        if self.multimask_output:
            return logits, iou_preds
        decoder = self.model.sam_mask_decoder
        if decoder.dynamic_multimask_via_stability and not decoder.training:
            return decoder._dynamic_multimask_via_stability(logits, iou_preds)
        return logits[:, :1], iou_preds[:, :1]

    def transform(self, side: ImageSide, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer: (tokens (P, n, C), image tokens (P, N, C))."""
        prompt_encoder, decoder = self.model.sam_prompt_encoder, self.model.sam_mask_decoder
        transformer = decoder.transformer
        p = coords.shape[0]
        sparse, _ = point_prompt_embeddings(prompt_encoder, coords)
        output_tokens = [decoder.iou_token.weight, decoder.mask_tokens.weight]
        if decoder.pred_obj_scores:
            output_tokens.insert(0, decoder.obj_score_token.weight)
        prompt_tokens = torch.cat([torch.cat(output_tokens).expand(p, -1, -1), sparse.to(side.tokens.dtype)], dim=1)

        queries, image = prompt_tokens, side.tokens
        for index, layer in enumerate(transformer.layers):
            if layer.skip_first_layer_pe:
                queries = layer.norm1(layer.self_attn(q=queries, k=queries, v=queries))
            else:
                q = queries + prompt_tokens
                queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
            q = queries + prompt_tokens
            if index == 0:  # the image side is the same for every prompt, projected once
                out = shared_tokens_to_image(layer.cross_attn_token_to_image, q, side.first_keys, side.first_values)
                image_queries = side.first_queries
            else:
                image_queries = image + side.pe
                out = tokens_to_image(layer.cross_attn_token_to_image, q, image, image_queries)
            queries = layer.norm2(queries + out)
            queries = layer.norm3(queries + layer.mlp(queries))
            image = image_to_tokens_update(
                layer.cross_attn_image_to_token, layer.norm4, image, image_queries, queries + prompt_tokens, queries
            )
        out = tokens_to_image(transformer.final_attn_token_to_image, queries + prompt_tokens, image, image + side.pe)
        return transformer.norm_final_attn(queries + out), image

    def heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer tokens -> (predicted IoUs (P, M), mask tokens (P, M, C)) of the masks
        returned (the three multimask outputs, or all four for single-mask selection)."""
        decoder = self.model.sam_mask_decoder
        s = 1 if decoder.pred_obj_scores else 0
        iou_preds = decoder.iou_prediction_head(tokens[:, s])
        mask_tokens = tokens[:, s + 1 : s + 1 + decoder.num_mask_tokens]
        if self.multimask_output:
            return iou_preds[:, 1:], mask_tokens[:, 1:]
        return iou_preds, mask_tokens

    @property
    def mask_size(self) -> tuple[int, int]:
        """Low-resolution masks are 4x the image embedding: 256x256 for a 1024-pixel input."""
        h, w = self.model.sam_prompt_encoder.image_embedding_size
        return 4 * h, 4 * w

    def mask_logits(self, side: ImageSide, image: torch.Tensor, mask_tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (P, N, C), upscaled 4x, against each mask token's hypernetwork output ->
        logits (P, M, 4h, 4w). The transposed convolutions are matrix products in a
        channels-last layout whose rows are (token, a, b[, e, f]); the bias and high-resolution
        features are the products' starting values."""
        decoder = self.model.sam_mask_decoder
        conv1, norm1, act1, conv2, act2 = decoder.output_upscaling
        p = image.shape[0]
        first = decoder.num_mask_tokens - mask_tokens.shape[1]  # the mask tokens given start here
        hyper = torch.stack(
            [mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps[first:])], dim=2
        )  # (P, C/8, M)
        c1, c2 = conv1.out_channels, conv2.out_channels
        up = product_plus(side.upscale_base1, image, transposed_conv_as_matrix(conv1))
        up = act1(F.layer_norm(up.reshape(p, -1, c1), (c1,), norm1.weight, norm1.bias, norm1.eps))
        up = product_plus(side.upscale_base2, up, transposed_conv_as_matrix(conv2)).reshape(p, -1, c2)
        if fusion_forms(up.device):
            # The read-out as one reduction over the C/8 channels, GELU inside: its (P, 16 N, C/8)
            # output is never written and read back (4 GB at 1024 prompts in float16), nor read
            # by a batched product with only M columns.
            masks = (act2(up)[..., None] * hyper[:, None]).sum(dim=2)
        else:
            masks = torch.bmm(act2(up), hyper)  # (P, 16 N, M), rows (y, x, a, b, e, f)
        # Into (P, M, 4h, 4w) by one gather of the flat (row, mask) positions: on a CPU three
        # times faster than the 8-dimensional permute it replaces (a 2% shorter decoder).
        m = masks.shape[-1]
        positions = self.image_order * m + torch.arange(m, device=masks.device)[:, None]  # (M, 16 N)
        return masks.reshape(p, -1).index_select(1, positions.reshape(-1)).reshape(p, m, *self.mask_size)
