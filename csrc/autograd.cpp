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

#include <string>
#include <tuple>

namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using VarlenFwdSignature = std::tuple<Tensor, Tensor>(const Tensor &, const Tensor &, const Tensor &,
                                                      const optional<Tensor> &, const optional<Tensor> &,
                                                      const Tensor &, const Tensor &, int64_t, int64_t, double, bool,
                                                      double, const optional<Tensor> &);
using DenseFwdSignature = std::tuple<Tensor, Tensor>(const Tensor &, const Tensor &, const Tensor &,
                                                     const optional<Tensor> &, const optional<Tensor> &, double,
                                                     bool, double);
constexpr char kVarlenFwd[] = "mha_varlen_fwd";
constexpr char kDenseFwd[] = "mha_fwd";

// The graph node of op flash_dmattn::<kOpName> (its schema's C++ signature: Signature).
template <const char *kOpName, class Signature>
struct ForwardOnly : public torch::autograd::Function<ForwardOnly<kOpName, Signature>> {
    template <class... Args>
    static variable_list forward(AutogradContext *ctx, const Args &...args) {
        static const auto op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow((std::string("flash_dmattn::") + kOpName).c_str(), "")
                                   .template typed<Signature>();
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        auto [out, lse] = op.call(args...);
        ctx->mark_non_differentiable({lse});
        return {out, lse};
    }
    static variable_list backward(AutogradContext *, variable_list) {
        TORCH_CHECK_NOT_IMPLEMENTED(false, "flash_dmattn: ", kOpName,
                                    " has no backward pass yet (forward only); call it under torch.no_grad() or on "
                                    "tensors that do not require grad");
        return {};
    }
};

// The Autograd kernel registered for the op: its own signature, (out, lse) from the node.
template <const char *kOpName, class Signature>
struct AutogradKernel;
template <const char *kOpName, class... Params>
struct AutogradKernel<kOpName, std::tuple<Tensor, Tensor>(Params...)> {
    static std::tuple<Tensor, Tensor> call(Params... args) {
        using Node = ForwardOnly<kOpName, std::tuple<Tensor, Tensor>(Params...)>;
        variable_list out_lse = Node::apply(args...);
        return {out_lse[0], out_lse[1]};
    }
};

}  // namespace

TORCH_LIBRARY_IMPL(flash_dmattn, Autograd, m) {
    m.impl(kVarlenFwd, &AutogradKernel<kVarlenFwd, VarlenFwdSignature>::call);
    m.impl(kDenseFwd, &AutogradKernel<kDenseFwd, DenseFwdSignature>::call);
}
