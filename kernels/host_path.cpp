// The C++ host path of flash_attention: an autograd node that launches the compiled Triton kernels itself.
//
// At the char GPT's shape the GPU runs a forward and backward in about 100 us, while the Python between
// them (an autograd.Function, its backward called back from the engine's thread, the launchers) costs
// more than that: the GPU waits for the host. This file removes the Python from calls whose signature
// (shapes, strides, dtypes, device, alignment, causal, scale, dropout) has been seen before.
//
// kernels/host_path.py turns the second call with a signature into a *plan*: for each kernel launch the
// Python path made, the compiled CUfunction, its grid and block, and its parameters as 8-byte words with
// the tensors' addresses left open, plus the layouts of the tensors the call allocated. A plan lives in a
// table under its signature's key. Later calls with the key allocate those tensors, fill in the
// addresses and call cuLaunchKernel, forward and backward, without entering Python. Anything without a
// plan (a new signature, a tensor subclass, a dispatch mode, a graph of the gradients) returns to Python.
#include <dlfcn.h>

#include <ATen/TensorSubclassLikeUtils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// ---------------------------------------------------------------------------------------------------
// The CUDA driver, opened at run time: the build links no driver library (it needs the CUDA toolkit's
// runtime headers for c10/cuda, as any CUDA extension of torch does).
// ---------------------------------------------------------------------------------------------------
using CUresult = int;
using CUfunction = void*;
using CUstream = void*;
using CUcontext = void*;

struct Driver {
  CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                            CUstream, void**, void**);
  CUresult (*ctx_get_current)(CUcontext*);
  CUresult (*device_get)(int*, int);
  CUresult (*primary_ctx_retain)(CUcontext*, int);
  CUresult (*ctx_set_current)(CUcontext);
};

const Driver& driver() {
  static const Driver d = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(lib != nullptr, "flash_attention host path: cannot open libcuda.so.1");
    auto symbol = [lib](const char* name) {
      void* p = dlsym(lib, name);
      TORCH_CHECK(p != nullptr, "flash_attention host path: libcuda.so.1 has no ", name);
      return p;
    };
    Driver d;
    d.launch_kernel = reinterpret_cast<decltype(d.launch_kernel)>(symbol("cuLaunchKernel"));
    d.ctx_get_current = reinterpret_cast<decltype(d.ctx_get_current)>(symbol("cuCtxGetCurrent"));
    d.device_get = reinterpret_cast<decltype(d.device_get)>(symbol("cuDeviceGet"));
    d.primary_ctx_retain = reinterpret_cast<decltype(d.primary_ctx_retain)>(symbol("cuDevicePrimaryCtxRetain"));
    d.ctx_set_current = reinterpret_cast<decltype(d.ctx_set_current)>(symbol("cuCtxSetCurrent"));
    return d;
  }();
  return d;
}

void check(CUresult result, const char* what) {
  TORCH_CHECK(result == 0, "flash_attention host path: ", what, " failed with CUDA driver error ", result);
}

// The driver API launches into the thread's current context. The autograd engine's device threads may
// have none yet (the runtime API creates it lazily): make the device's primary context current, as
// Triton's own launcher does.
void ensure_context(int device_index) {
  CUcontext ctx = nullptr;
  check(driver().ctx_get_current(&ctx), "cuCtxGetCurrent");
  if (ctx != nullptr) return;
  int device = 0;
  check(driver().device_get(&device, device_index), "cuDeviceGet");
  check(driver().primary_ctx_retain(&ctx, device), "cuDevicePrimaryCtxRetain");
  check(driver().ctx_set_current(ctx), "cuCtxSetCurrent");
}

// ---------------------------------------------------------------------------------------------------
// Plans
// ---------------------------------------------------------------------------------------------------
// A tensor a call allocates: the output, the log-sum-exp, the gradients, delta.
struct Alloc {
  int slot;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
};

// One kernel launch, fixed but for the tensors' addresses. Triton kernels take their non-constexpr
// arguments in signature order, then two scratch pointers (null: these kernels use no scratch).
struct Launch {
  CUfunction function;
  unsigned grid_x, grid_y, grid_z, threads, shared_bytes;
  std::vector<uint64_t> words;               // one word per parameter, scalars filled in (little-endian)
  std::vector<std::pair<int, int>> addresses;  // (parameter, slot): the tensor whose address goes there
};

struct Plan {
  int num_slots;
  std::vector<Alloc> allocs;
  std::vector<Launch> launches;
};

// Slots: the tensors a plan's launches address. The first ones are the call's own tensors, in this
// order; allocated tensors the Python path made for itself (delta) come after.
enum ForwardSlot { F_Q, F_K, F_V, F_SEED, F_OUT, F_LSE, FORWARD_SLOTS };
enum BackwardSlot { B_Q, B_K, B_V, B_OUT, B_LSE, B_SEED, B_GRAD_OUT, B_DQ, B_DK, B_DV, BACKWARD_SLOTS };

constexpr size_t kMaxPlans = 1024;  // per direction; a full table starts over
constexpr size_t kMaxParams = 128;

struct PlanTable {
  std::mutex mutex;  // the backward runs on the autograd engine's thread, without the GIL
  std::unordered_map<std::string, std::shared_ptr<const Plan>> plans;

  std::shared_ptr<const Plan> find(const std::string& key) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = plans.find(key);
    return it == plans.end() ? nullptr : it->second;
  }
};

PlanTable forward_plans, backward_plans;

bool poison = false;  // tests: fill what a plan allocates with NaN (or -1), so unwritten elements show

void run(const Plan& plan, std::vector<at::Tensor>& slots, const at::Tensor& like) {
  for (const Alloc& a : plan.allocs) {
    slots[a.slot] = at::empty_strided(a.sizes, a.strides, like.options().dtype(a.dtype));
    if (poison) slots[a.slot].fill_(at::isFloatingType(a.dtype) ? NAN : -1);
  }
  const int device = like.get_device();
  ensure_context(device);
  CUstream stream = c10::cuda::getCurrentCUDAStream(device).stream();
  for (const Launch& l : plan.launches) {
    uint64_t words[kMaxParams];
    void* params[kMaxParams];
    std::memcpy(words, l.words.data(), l.words.size() * sizeof(uint64_t));
    for (const auto& [param, slot] : l.addresses)
      words[param] = reinterpret_cast<uint64_t>(slots[slot].data_ptr());
    for (size_t i = 0; i < l.words.size(); ++i) params[i] = &words[i];
    check(driver().launch_kernel(l.function, l.grid_x, l.grid_y, l.grid_z, l.threads, 1, 1, l.shared_bytes,
                                 stream, params, nullptr),
          "cuLaunchKernel");
  }
}

// ---------------------------------------------------------------------------------------------------
// Keys: everything the Python path's checks and Triton's specialization depend on
// ---------------------------------------------------------------------------------------------------
void put(std::string& key, int64_t x) { key.append(reinterpret_cast<const char*>(&x), sizeof x); }

void put(std::string& key, const at::Tensor& t) {
  put(key, t.dim());
  for (int64_t s : t.sizes()) put(key, s);
  for (int64_t s : t.strides()) put(key, s);
  put(key, static_cast<int64_t>(t.scalar_type()));
  put(key, t.get_device());
  put(key, reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0);  // Triton specializes on 16-byte alignment
}

void put_double(std::string& key, double x) {
  int64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  put(key, bits);
}

// A plain dense CUDA tensor: no subclass, no functorch wrapper, no dispatch mode active.
const at::Tensor* plain_cuda_tensor(py::handle obj) {
  if (!THPVariable_CheckExact(obj.ptr())) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj.ptr());
  if (!t.is_cuda() || at::isTensorSubclassLike(t)) return nullptr;
  return &t;
}

// A float from a Python float or int (not a bool), or false.
bool number(py::handle obj, double& out) {
  if (PyFloat_CheckExact(obj.ptr())) {
    out = PyFloat_AS_DOUBLE(obj.ptr());
    return true;
  }
  if (PyLong_CheckExact(obj.ptr())) {
    out = PyLong_AsDouble(obj.ptr());
    return !PyErr_Occurred() || (PyErr_Clear(), false);
  }
  return false;
}

struct Call {
  const at::Tensor *q, *k, *v;
  bool causal;
  double scale, dropout_p;
  std::string key;
};

// The call's key, or false when the C++ path does not take it.
bool forward_call(py::handle q, py::handle k, py::handle v, py::handle causal, py::handle sm_scale,
                  py::handle dropout_p, Call& call) {
  call.q = plain_cuda_tensor(q);
  call.k = plain_cuda_tensor(k);
  call.v = plain_cuda_tensor(v);
  if (!call.q || !call.k || !call.v || !PyBool_Check(causal.ptr())) return false;
  if (call.q->dim() != 4 || call.k->dim() != 4 || call.v->dim() != 4) return false;  // Python says why
  double scale = 0.0;
  if (!sm_scale.is_none() && !number(sm_scale, scale)) return false;
  if (!number(dropout_p, call.dropout_p)) return false;
  call.causal = causal.ptr() == Py_True;
  call.scale = sm_scale.is_none() ? 1.0 / std::sqrt(static_cast<double>(call.q->size(-1))) : scale;
  call.key.reserve(512);
  put(call.key, *call.q);
  put(call.key, *call.k);
  put(call.key, *call.v);
  put(call.key, call.causal);
  put(call.key, sm_scale.is_none());
  put_double(call.key, scale);
  put_double(call.key, call.dropout_p);
  return true;
}

// The backward's key: the forward's, the layouts of what the backward reads, and whether deterministic
// algorithms are asked for (they change the launches: _bwd_plan). Saved-tensor hooks (e.g.
// torch.autograd.graph.save_on_cpu) may hand back q, k, v, out or lse with other strides than they had.
std::string backward_key(const std::string& forward_key, const variable_list& saved,
                         const at::Tensor& grad_out) {
  std::string key = forward_key;
  for (const at::Tensor& t : saved) {
    put(key, t.defined());
    if (t.defined()) put(key, t);
  }
  put(key, grad_out);
  put(key, at::globalContext().deterministicAlgorithms());
  return key;
}

// Python's backward for what has no plan; set by host_path.py.
py::object* python_backward = nullptr;

// ---------------------------------------------------------------------------------------------------
// The autograd node
// ---------------------------------------------------------------------------------------------------
struct FlashAttention : public torch::autograd::Function<FlashAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const Plan* plan, const std::string& key, bool causal, double scale,
                            double dropout_p) {
    c10::cuda::CUDAGuard guard(q.device());
    std::vector<at::Tensor> slots(plan->num_slots);
    slots[F_Q] = q;
    slots[F_K] = k;
    slots[F_V] = v;
    if (dropout_p > 0.0)  // the same draw as the Python path's, from torch's generator for the device
      slots[F_SEED] = at::randint(0, 2147483647, {1}, q.options().dtype(at::kLong));
    run(*plan, slots, q);
    ctx->save_for_backward({q, k, v, slots[F_OUT], slots[F_LSE], slots[F_SEED]});
    ctx->saved_data["key"] = key;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    return slots[F_OUT];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();  // q, k, v, out, lse, seed
    const at::Tensor& grad_out = grads[0];
    const std::string& key = ctx->saved_data["key"].toStringRef();
    // Not with create_graph (the gradients need the Python path's node that refuses a second backward),
    // nor for tensor subclasses (which saved-tensor hooks may hand back).
    bool plannable = !at::GradMode::is_enabled() && !at::isTensorSubclassLike(grad_out);
    for (const at::Tensor& t : saved) plannable = plannable && !(t.defined() && at::isTensorSubclassLike(t));
    const std::string plan_key = plannable ? backward_key(key, saved, grad_out) : std::string();
    std::shared_ptr<const Plan> plan = plannable ? backward_plans.find(plan_key) : nullptr;
    at::Tensor dq, dk, dv;
    if (plan) {
      c10::cuda::CUDAGuard guard(saved[0].device());
      std::vector<at::Tensor> slots(plan->num_slots);
      for (int i = 0; i < 6; ++i) slots[i] = saved[i];  // B_Q .. B_SEED
      slots[B_GRAD_OUT] = grad_out;
      run(*plan, slots, saved[0]);
      dq = slots[B_DQ], dk = slots[B_DK], dv = slots[B_DV];
    } else {  // Python computes them, and plans this backward when it can
      py::gil_scoped_acquire gil;
      try {
        py::tuple g = (*python_backward)(
            grad_out, saved[0], saved[1], saved[2], saved[3], saved[4],
            saved[5].defined() ? py::cast(saved[5]) : py::none(), ctx->saved_data["causal"].toBool(),
            ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
            plannable ? py::object(py::bytes(plan_key)) : py::object(py::none()));
        dq = g[0].cast<at::Tensor>(), dk = g[1].cast<at::Tensor>(), dv = g[2].cast<at::Tensor>();
      } catch (py::error_already_set& e) {  // rethrown in the caller's thread as the same Python exception
        e.restore();
        python_error error;
        error.persist();
        throw error;
      }
    }
    // One gradient per argument of forward: none for the plan, key, causal, scale and dropout_p.
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------------
// What Python calls
// ---------------------------------------------------------------------------------------------------
// The output, or None: no plan for this call (Python takes it, and plans it).
py::object forward(py::handle q, py::handle k, py::handle v, py::handle causal, py::handle sm_scale,
                   py::handle dropout_p) {
  Call call;
  if (!forward_call(q, k, v, causal, sm_scale, dropout_p, call)) return py::none();
  std::shared_ptr<const Plan> plan = forward_plans.find(call.key);
  if (!plan) return py::none();
  return py::cast(FlashAttention::apply(*call.q, *call.k, *call.v, plan.get(), call.key, call.causal,
                                        call.scale, call.dropout_p));
}

py::object forward_key(py::handle q, py::handle k, py::handle v, py::handle causal, py::handle sm_scale,
                       py::handle dropout_p) {
  Call call;
  if (!forward_call(q, k, v, causal, sm_scale, dropout_p, call)) return py::none();
  return py::bytes(call.key);
}

// A plan from host_path.py: allocs as (slot, sizes, strides, dtype as torch.dtype), launches as (function,
// grid, threads, shared bytes, words, addresses).
void add_plan(bool backward, const std::string& key, int num_slots, py::list allocs, py::list launches) {
  auto plan = std::make_shared<Plan>();
  plan->num_slots = num_slots;
  for (py::handle a : allocs) {
    auto t = a.cast<py::tuple>();
    plan->allocs.push_back({t[0].cast<int>(), t[1].cast<std::vector<int64_t>>(),
                            t[2].cast<std::vector<int64_t>>(), t[3].cast<at::ScalarType>()});
  }
  for (py::handle l : launches) {
    auto t = l.cast<py::tuple>();
    auto grid = t[1].cast<std::vector<unsigned>>();
    TORCH_CHECK(grid.size() == 3, "flash_attention host path: a grid has three axes");
    Launch launch{reinterpret_cast<CUfunction>(t[0].cast<uintptr_t>()), grid[0], grid[1], grid[2],
                  t[2].cast<unsigned>(), t[3].cast<unsigned>(), t[4].cast<std::vector<uint64_t>>(),
                  t[5].cast<std::vector<std::pair<int, int>>>()};
    TORCH_CHECK(launch.words.size() <= kMaxParams, "flash_attention host path: too many kernel parameters");
    for (const auto& [param, slot] : launch.addresses)
      TORCH_CHECK(param >= 0 && param < static_cast<int>(launch.words.size()) && slot >= 0 && slot < num_slots,
                  "flash_attention host path: an address out of range");
    plan->launches.push_back(std::move(launch));
  }
  PlanTable& table = backward ? backward_plans : forward_plans;
  std::lock_guard<std::mutex> lock(table.mutex);
  if (table.plans.size() >= kMaxPlans) table.plans.clear();  // plans in flight hold their own reference
  table.plans[key] = std::move(plan);
}

void clear_plans() {
  for (PlanTable* table : {&forward_plans, &backward_plans}) {
    std::lock_guard<std::mutex> lock(table->mutex);
    table->plans.clear();
  }
}

std::pair<size_t, size_t> num_plans() {
  std::lock_guard<std::mutex> f(forward_plans.mutex);
  std::lock_guard<std::mutex> b(backward_plans.mutex);
  return {forward_plans.plans.size(), backward_plans.plans.size()};
}

void set_python_backward(py::object fn) {
  // Kept for the life of the process: the engine may call it from its thread until the very end.
  python_backward = new py::object(std::move(fn));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("forward_key", &forward_key);
  m.def("add_plan", &add_plan);
  m.def("clear_plans", &clear_plans);
  m.def("num_plans", &num_plans);
  m.def("set_python_backward", &set_python_backward);
  m.def("set_poison", [](bool on) { poison = on; });
  m.attr("FORWARD_SLOTS") = static_cast<int>(FORWARD_SLOTS);
  m.attr("BACKWARD_SLOTS") = static_cast<int>(BACKWARD_SLOTS);
}
