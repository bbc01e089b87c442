// autograd.cpp: the Autograd kernels of flash_dmattn's ops.
//
// The ops have no backward pass yet (forward only). Without an Autograd kernel, torch's fallback
// would let `out.sum().backward()` return silently wrong (zero) gradients; these kernels instead
// record a graph node whose backward refuses with NotImplementedError. They are written in C++
// (not with torch.library.register_autograd) because a Python Autograd kernel runs on every call,
// gradients or not, and cost a small decode step about as much host time as the whole launch.
//
// Each forward redispatches the op below the Autograd key (to CPU, CUDA or Meta/Fake), so the
// validation and the kernels stay in binding.cpp. lse never has a gradient.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

variable_list refuse_backward(const char *op_name) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "flash_dmattn: ", op_name,
                                " has no backward pass yet (forward only); call it under torch.no_grad() or on "
                                "tensors that do not require grad");
    return {};
}

using VarlenFwdSignature = std::tuple<Tensor, Tensor>(const Tensor &, const Tensor &, const Tensor &,
                                                      const optional<Tensor> &, const optional<Tensor> &,
                                                      const Tensor &, const Tensor &, int64_t, int64_t, double, bool,
                                                      double, const optional<Tensor> &);
using DenseFwdSignature = std::tuple<Tensor, Tensor>(const Tensor &, const Tensor &, const Tensor &,
                                                     const optional<Tensor> &, const optional<Tensor> &, double,
                                                     bool, double);

struct VarlenFwd : public torch::autograd::Function<VarlenFwd> {
    static variable_list forward(AutogradContext *ctx, const Tensor &q, const Tensor &k, const Tensor &v,
                                 const optional<Tensor> &attn_mask, const optional<Tensor> &attn_bias,
                                 const Tensor &cu_seqlens_q, const Tensor &cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, double scale, bool is_causal, double softcap,
                                 const optional<Tensor> &block_table) {
        static const auto op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("flash_dmattn::mha_varlen_fwd", "")
                                   .typed<VarlenFwdSignature>();
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        auto [out, lse] = op.call(q, k, v, attn_mask, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, scale, is_causal, softcap, block_table);
        ctx->mark_non_differentiable({lse});
        return {out, lse};
    }
    static variable_list backward(AutogradContext *, variable_list) { return refuse_backward("mha_varlen_fwd"); }
};

struct DenseFwd : public torch::autograd::Function<DenseFwd> {
    static variable_list forward(AutogradContext *ctx, const Tensor &q, const Tensor &k, const Tensor &v,
                                 const optional<Tensor> &attn_mask, const optional<Tensor> &attn_bias, double scale,
                                 bool is_causal, double softcap) {
        static const auto op =
            c10::Dispatcher::singleton().findSchemaOrThrow("flash_dmattn::mha_fwd", "").typed<DenseFwdSignature>();
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        auto [out, lse] = op.call(q, k, v, attn_mask, attn_bias, scale, is_causal, softcap);
        ctx->mark_non_differentiable({lse});
        return {out, lse};
    }
    static variable_list backward(AutogradContext *, variable_list) { return refuse_backward("mha_fwd"); }
};

std::tuple<Tensor, Tensor> varlen_fwd_autograd(const Tensor &q, const Tensor &k, const Tensor &v,
                                               const optional<Tensor> &attn_mask, const optional<Tensor> &attn_bias,
                                               const Tensor &cu_seqlens_q, const Tensor &cu_seqlens_k,
                                               int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                               bool is_causal, double softcap, const optional<Tensor> &block_table) {
    variable_list out_lse = VarlenFwd::apply(q, k, v, attn_mask, attn_bias, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, scale, is_causal, softcap, block_table);
    return {out_lse[0], out_lse[1]};
}

std::tuple<Tensor, Tensor> dense_fwd_autograd(const Tensor &q, const Tensor &k, const Tensor &v,
                                              const optional<Tensor> &attn_mask, const optional<Tensor> &attn_bias,
                                              double scale, bool is_causal, double softcap) {
    variable_list out_lse = DenseFwd::apply(q, k, v, attn_mask, attn_bias, scale, is_causal, softcap);
    return {out_lse[0], out_lse[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_dmattn, Autograd, m) {
    m.impl("mha_varlen_fwd", &varlen_fwd_autograd);
    m.impl("mha_fwd", &dense_fwd_autograd);
}
