"""A trained model's kernels into a warehouse: what ``convert(..., init=...)`` does to the cells.

``init="preserve"`` (the default) keeps what the model learned (issue 14's rule): at b >= 1
every layer's kernel is cut into its own cells (the one-to-one walk of Sec. 3.3) and the
attention is held on beta at every temperature, so the converted model computes the
original; below 1 the cells are the best low-rank fit of the stacked kernels (a truncated
SVD), and the fit to outputs on calibration data (:mod:`.calibrate`) refines it where the
user gives inputs.  ``"random"`` is the paper's from-scratch init.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...plan import LayerPlan, WarehousePlan
from . import calibrate, cells
from .layers import HOLDABLE_BETA_L1, KWConv1d, KWConv2d, KWConv3d, KWLinear, Warehouse, kernel_to_blocks

KW_CLASS = {"conv1d": KWConv1d, "conv2d": KWConv2d, "conv3d": KWConv3d, "linear": KWLinear}


def new_warehouse(plan: WarehousePlan, first_static: nn.Module) -> Warehouse:
    weight = first_static.weight
    return Warehouse(plan.n, tuple(plan.cell), name=plan.name, device=weight.device, dtype=weight.dtype)


def kw_layer(layer: LayerPlan, warehouse_plan: WarehousePlan, warehouse: Warehouse,
              static: nn.Module) -> nn.Module:
    return KW_CLASS[layer.kind].from_module(
        static, warehouse=warehouse, offset=layer.offset, budget=warehouse_plan.budget,
        hidden=layer.hidden, attention_norm=warehouse_plan.attention_norm,
        basis_ratio=warehouse_plan.basis_ratio, name=layer.name)


def initialise(plan: WarehousePlan, warehouse: Warehouse, kw_layers: list[nn.Module],
                statics: list[nn.Module], init: str,
                grams: list[torch.Tensor | None]) -> tuple[float | None, float | None]:
    """Fill the cells; return the relative reconstruction error of the kernels and, after a
    fit to calibration outputs (``grams`` of every layer given), that of the outputs."""
    with torch.no_grad():
        if init == "none":
            return plan.init_error, plan.output_error
        if init == "random":
            for layer in plan.layers:
                span = cells.cells_handed_out(layer.cells, plan.budget)
                warehouse.reset_cells(layer.offset, layer.offset + span)
            return None, None
        if warehouse.cells.is_meta:  # shapes only: there are no kernel values to keep
            return None, None
        error, output_error = 0.0, None
        if plan.budget >= 1:
            for kw_layer, static in zip(kw_layers, statics):
                kw_layer.load_static_weight(static.weight)
        else:
            stacked = _stacked_blocks(kw_layers, statics, _fit_dtype(warehouse.cells.device))
            _fit_low_rank(warehouse, kw_layers, stacked)
            if grams and all(gram is not None for gram in grams):
                output_error = calibrate.fit_outputs(kw_layers, statics, grams, warehouse.cells)
            error = _kernel_error(warehouse, kw_layers, stacked)
        _hold_at_every_temperature(warehouse, kw_layers)
        return error, output_error


def _hold_at_every_temperature(warehouse: Warehouse, kw_layers: list[nn.Module]) -> None:
    """Keep the layers' kernels at every CAF temperature, not only at tau = 1.

    At tau = 1 CAF returns beta (Sec. 3.3), and the cells are cut (b >= 1) or fitted (b < 1)
    so that beta rebuilds the kernels.  Below 1 it mixes in the normalised logits, which a
    random attention makes arbitrary: the paper's schedule would walk a trained model away
    from what it learned.  Each attention therefore starts input-independent with logits
    that CAF maps to beta itself (``KWAttention.hold_beta``).  That needs every beta row's
    L1 norm within ``HOLDABLE_BETA_L1``; where a row exceeds it (one-to-one rows have norm
    1, fitted rows up to sqrt(n)), beta shrinks and the warehouse's cells grow by the same
    factor, which leaves every kernel ``beta @ cells`` as it was.
    """
    largest = max(float(layer.attention.beta[:, :-1].abs().sum(dim=-1).max()) for layer in kw_layers)
    if largest > HOLDABLE_BETA_L1:
        factor = HOLDABLE_BETA_L1 / largest
        warehouse.cells.div_(factor)
        for layer in kw_layers:
            layer.attention.set_beta(layer.attention.beta[:, :-1] * factor)
    for layer in kw_layers:
        layer.attention.hold_beta()


def _fit_low_rank(warehouse: Warehouse, kw_layers: list[nn.Module], stacked: torch.Tensor) -> None:
    """Best fit of all the warehouse's kernel blocks (``stacked``, :func:`_stacked_blocks`) by
    n cells (b < 1).

    The warehouse has fewer cells than the layers have blocks, so no one-to-one copy can
    hold them.  Stacking the blocks of every sharing layer as rows of X (m_t x cell size),
    the truncated SVD X ~ U_n S_n V_n^T is the least-squares optimum among all n-cell
    reconstructions (Eckart-Young): the cells become S_n V_n^T and each mixture's
    starting attention (beta, the tau = 1 point of the CAF, paper Sec. 3.3) becomes its
    row of U_n.
    """
    coefficients, cells, smallest = _truncated_svd(stacked, warehouse.n)
    rank = coefficients.shape[1]
    if rank < warehouse.n:  # cells no block needs: small random ones, free to learn later
        spare = torch.empty(warehouse.n - rank, stacked.shape[1], dtype=stacked.dtype, device=stacked.device)
        nn.init.normal_(spare, std=smallest / math.sqrt(stacked.shape[1]) if smallest > 0 else 0.01)
        cells = torch.cat([cells, spare])
        coefficients = torch.cat([coefficients, coefficients.new_zeros(coefficients.shape[0], warehouse.n - rank)], 1)
    warehouse.cells.copy_(cells.view_as(warehouse.cells).to(warehouse.cells))
    start = 0
    for kw_layer in kw_layers:
        kw_layer.attention.set_beta(coefficients[start:start + kw_layer.cells])
        start += kw_layer.cells


def _stacked_blocks(kw_layers: list[nn.Module], statics: list[nn.Module], dtype: torch.dtype) -> torch.Tensor:
    """Every layer's kernel cut into its blocks, stacked: ``(m_t, cell numel)``."""
    return torch.cat([kernel_to_blocks(kw_layer.tiling, static.weight.detach().to(dtype))
                      for static, kw_layer in zip(statics, kw_layers)], dim=0)


def _kernel_error(warehouse: Warehouse, kw_layers: list[nn.Module], stacked: torch.Tensor) -> float:
    """``|X - beta @ cells| / |X|`` over the stacked kernel blocks X: 0 where the copy is exact."""
    dtype = stacked.dtype
    rebuilt = torch.cat([layer.attention.beta[:, :-1].to(dtype) for layer in kw_layers]) \
        @ warehouse.cells.detach().to(dtype).reshape(warehouse.n, -1)
    norm = torch.linalg.norm(stacked)
    return float(torch.linalg.norm(stacked - rebuilt) / norm) if norm > 0 else 0.0


def _fit_dtype(device: torch.device) -> torch.dtype:
    """float64 for the least-squares fit, where the device has it (Apple's MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``U_r``, ``S_r V_r^T`` and the smallest singular value of ``matrix`` (on its device).

    Through the eigenvectors of the smaller Gram matrix rather than LAPACK's SVD: the
    blocks matrix is wide (ResNet50's stage 3 at b = 1/2 is 552 x 16,384), where the SVD's
    bidiagonalisation takes seconds per warehouse and one matrix product a fraction of one.
    Squaring the condition number only blurs the directions past the n kept, whose
    projection is still a valid (and, for the kept ones, the optimal) reconstruction.
    """
    rows, columns = matrix.shape
    rank = min(rank, rows, columns)
    if rows <= columns:
        values, vectors = torch.linalg.eigh(matrix @ matrix.T)   # ascending
        left = vectors.flip(-1)[:, :rank]
        right_scaled = left.T @ matrix                          # S_r V_r^T
    else:
        values, vectors = torch.linalg.eigh(matrix.T @ matrix)
        right = vectors.flip(-1)[:, :rank]
        scaled_left = matrix @ right                            # U_r S_r
        singular = scaled_left.norm(dim=0)
        left = scaled_left / singular.clamp_min(torch.finfo(matrix.dtype).tiny)
        right_scaled = singular[:, None] * right.T
    smallest = float(values.clamp_min(0).min().sqrt()) if values.numel() else 0.0
    return left, right_scaled, smallest
