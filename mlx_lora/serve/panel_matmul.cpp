// A decode step's products on the CPU: y (rows, out) = x (rows, in) @ W.T for a few rows, W float32
// stored as panels of PANEL output features: panels (ceil(out / PANEL), in, PANEL), panels[p, i, j] =
// W[p * PANEL + j, i] (zero past `out`). Built at run time by panel_kernel.py against the installed
// MLX; see that file for why and for the measurements.
//
// For each panel the kernel streams its weights once, in order, and keeps PANEL outputs of up to
// TILE_ROWS rows in vector registers (2 x TILE_ROWS 16-float accumulators): every weight read from
// memory serves all the rows, with no horizontal sums. Each row's outputs are summed in the same
// order whatever the number of rows or threads, so a row gets the same floats alone or in a batch.
// The panels of one product are shared among the pool's threads by an atomic counter (whichever
// thread is free takes the next chunk), so a helper that wakes late only does less.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#include <cstdint>

#include <nanobind/nanobind.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

namespace {

constexpr int PANEL = 32;                // output features per panel (two 16-float vectors)
constexpr int TILE_ROWS = 8;             // rows kept in registers at once
constexpr int PREFETCH_FLOATS = 1024;    // software prefetch distance: 4 KB ahead in the panel stream
constexpr int CHUNK_PANELS = 4;          // panels a thread takes at a time
constexpr int SPIN_MICROSECONDS = 100;   // a helper spins this long for the next product, then sleeps

typedef float vec16 __attribute__((vector_size(64), aligned(4)));

inline vec16 load16(const float* p) {
  return *reinterpret_cast<const vec16*>(p);  // an unaligned vector load (the type's alignment is 4)
}

// Each row's adapter term (see `lora_panel_matmul`): z (rows, rank), already scaled, and for each
// row the slot whose B panels it adds; rows without an adapter have slot -1.
struct Lora {
  const float* z = nullptr;         // (rows, rank)
  const int* slot = nullptr;        // (rows,)
  const float* b_panels = nullptr;  // (slots, n_panels, rank, PANEL)
  int rank = 0;
  int n_panels = 0;
};

// Panels [p0, p1) for `B` rows: x (B, in) with row stride ldx, y (B, out) with row stride ldy;
// `lora` (rows offset to this tile) adds each row's z @ B after the base sums.
template <int B>
void panel_tile(const float* x, long ldx, const float* panels, int in, float* y, long ldy, int out, int p0, int p1,
                const Lora& lora) {
  for (int p = p0; p < p1; ++p) {
    vec16 a0[B], a1[B];
    for (int b = 0; b < B; ++b) {
      a0[b] = vec16{};
      a1[b] = vec16{};
    }
    const float* w = panels + static_cast<size_t>(p) * in * PANEL;
    for (int i = 0; i < in; ++i) {
      const float* wi = w + static_cast<size_t>(i) * PANEL;
      __builtin_prefetch(wi + PREFETCH_FLOATS);
      __builtin_prefetch(wi + PREFETCH_FLOATS + 16);
      vec16 w0 = load16(wi), w1 = load16(wi + 16);
      for (int b = 0; b < B; ++b) {
        float s = x[b * ldx + i];
        a0[b] += w0 * s;
        a1[b] += w1 * s;
      }
    }
    if (lora.z != nullptr) {
      for (int b = 0; b < B; ++b) {
        if (lora.slot[b] < 0) continue;
        const float* bp = lora.b_panels + (static_cast<size_t>(lora.slot[b]) * lora.n_panels + p) * lora.rank * PANEL;
        const float* zb = lora.z + static_cast<size_t>(b) * lora.rank;
        for (int k = 0; k < lora.rank; ++k) {
          a0[b] += load16(bp + k * PANEL) * zb[k];
          a1[b] += load16(bp + k * PANEL + 16) * zb[k];
        }
      }
    }
    int first = p * PANEL, n = std::min(PANEL, out - first);
    for (int b = 0; b < B; ++b) {
      float row[PANEL];
      std::memcpy(row, &a0[b], sizeof(vec16));
      std::memcpy(row + 16, &a1[b], sizeof(vec16));
      std::memcpy(y + b * ldy + first, row, sizeof(float) * n);
    }
  }
}

void tile(int rows, const float* x, long ldx, const float* panels, int in, float* y, long ldy, int out, int p0, int p1,
          const Lora& lora) {
  switch (rows) {
    case 1: return panel_tile<1>(x, ldx, panels, in, y, ldy, out, p0, p1, lora);
    case 2: return panel_tile<2>(x, ldx, panels, in, y, ldy, out, p0, p1, lora);
    case 3: return panel_tile<3>(x, ldx, panels, in, y, ldy, out, p0, p1, lora);
    case 4: return panel_tile<4>(x, ldx, panels, in, y, ldy, out, p0, p1, lora);
    case 5: return panel_tile<5>(x, ldx, panels, in, y, ldy, out, p0, p1, lora);
    case 6: return panel_tile<6>(x, ldx, panels, in, y, ldy, out, p0, p1, lora);
    case 7: return panel_tile<7>(x, ldx, panels, in, y, ldy, out, p0, p1, lora);
    default: return panel_tile<8>(x, ldx, panels, in, y, ldy, out, p0, p1, lora);
  }
}

struct Product {
  const float* x;
  long ldx;
  const float* panels;
  float* y;
  int rows, in, out, n_panels;
  Lora lora;                 // z == nullptr: no adapter term
  std::atomic<int> next{0};  // next chunk to take
  std::atomic<int> done{0};  // panels finished

  void work() {
    for (;;) {
      int p0 = next.fetch_add(CHUNK_PANELS, std::memory_order_relaxed);
      if (p0 >= n_panels) return;
      int p1 = std::min(p0 + CHUNK_PANELS, n_panels);
      for (int r = 0; r < rows; r += TILE_ROWS) {
        Lora part = lora;
        if (part.z != nullptr) {
          part.z += static_cast<size_t>(r) * part.rank;
          part.slot += r;
        }
        tile(std::min(TILE_ROWS, rows - r), x + r * ldx, ldx, panels, in, y + static_cast<long>(r) * out, out, out, p0, p1,
             part);
      }
      done.fetch_add(p1 - p0, std::memory_order_release);
    }
  }
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Helper threads that join the caller on each product: they spin SPIN_MICROSECONDS for the next
// one (a step's products come back to back), then sleep until woken.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool(threads_wanted());  // never destroyed: helpers may outlive exit handlers
    return *pool;
  }

  int threads() const { return static_cast<int>(helpers_.size()) + 1; }

  void run(Product& product) {
    std::lock_guard<std::mutex> one_at_a_time(run_mutex_);  // two CPU streams may multiply at once
    if (!helpers_.empty()) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        current_ = &product;
        generation_.fetch_add(1, std::memory_order_release);
      }
      if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    }
    product.work();
    // Chunks a helper took are still running: spin, but let other threads have the core now and
    // then (on a busy 2-core machine the helper may be waiting for it).
    for (int spins = 1; product.done.load(std::memory_order_acquire) < product.n_panels; ++spins) {
      cpu_relax();
      if (spins % 64 == 0) std::this_thread::yield();
    }
    if (!helpers_.empty()) {
      // Helpers still reading `product` (they took no chunk but hold the pointer) must let go first.
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = nullptr;
      while (busy_.load(std::memory_order_acquire) > 0) cpu_relax();
    }
  }

 private:
  static int threads_wanted() {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("MLX_LORA_PANEL_THREADS")) n = std::atoi(env);
    return std::max(1, std::min(n, 64));
  }

  explicit Pool(int threads) {
    for (int t = 1; t < threads; ++t) helpers_.emplace_back([this] { loop(); });
    for (auto& h : helpers_) h.detach();
  }

  void loop() {
    long seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      long now_gen;
      int spins = 0;
      while ((now_gen = generation_.load(std::memory_order_acquire)) == seen) {
        cpu_relax();
        if (++spins % 64 == 0) std::this_thread::yield();  // a thread with work to do goes first
        if (spins % 256 == 0 &&
            std::chrono::steady_clock::now() - start > std::chrono::microseconds(SPIN_MICROSECONDS)) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleepers_.fetch_add(1, std::memory_order_acq_rel);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
          start = std::chrono::steady_clock::now();
        }
      }
      seen = now_gen;
      Product* product;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        product = current_;
        if (product != nullptr) busy_.fetch_add(1, std::memory_order_acq_rel);
      }
      if (product != nullptr) {
        product->work();
        busy_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> helpers_;
  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<long> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> busy_{0};
  Product* current_ = nullptr;
};

// The adapter inputs of one product, when there are any (pointers into MLX arrays).
struct LoraInputs {
  const float* a = nullptr;         // (slots, in, rank)
  const float* b_panels = nullptr;  // (slots, n_panels, rank, PANEL)
  const float* scales = nullptr;    // (slots,)
  const uint32_t* slots = nullptr;  // (rows,), every `slot_stride`-th element
  long slot_stride = 1;
  int n_slots = 0;
  int rank = 0;
};

typedef float vec8 __attribute__((vector_size(32), aligned(4)));

// z (rank,) += x (in,) @ a (in, rank), a row-major: a row of `a` at a time, 8 ranks per vector.
void lora_down(const float* x, const float* a, int in, int rank, float* z) {
  int k0 = 0;
  for (; k0 + 8 <= rank; k0 += 8) {
    vec8 acc{};
    for (int i = 0; i < in; ++i) acc += *reinterpret_cast<const vec8*>(a + static_cast<size_t>(i) * rank + k0) * x[i];
    for (int k = 0; k < 8; ++k) z[k0 + k] += acc[k];
  }
  for (int k = k0; k < rank; ++k) {
    float acc = 0.0f;
    for (int i = 0; i < in; ++i) acc += a[static_cast<size_t>(i) * rank + k] * x[i];
    z[k] += acc;
  }
}

void panel_product(const float* x, long ldx, const float* panels, float* y, int rows, int in, int out, int n_panels,
                   const LoraInputs* adapters = nullptr) {
  Product product;
  product.x = x;
  product.ldx = ldx;
  product.panels = panels;
  product.y = y;
  product.rows = rows;
  product.in = in;
  product.out = out;
  product.n_panels = n_panels;
  std::vector<float> z;
  std::vector<int> slot;
  if (adapters != nullptr && adapters->rank > 0) {
    // z (rows, rank) = scale * x @ A for each row's slot; slot 0 (the bare base) and slots this layer
    // has no adapter for add nothing.
    const int rank = adapters->rank;
    z.assign(static_cast<size_t>(rows) * rank, 0.0f);
    slot.assign(rows, -1);
    bool any = false;
    for (int r = 0; r < rows; ++r) {
      uint32_t s = adapters->slots[r * adapters->slot_stride];
      if (s == 0 || s >= static_cast<uint32_t>(adapters->n_slots) || adapters->scales[s] == 0.0f) continue;
      slot[r] = static_cast<int>(s);
      any = true;
      const float* a = adapters->a + static_cast<size_t>(s) * in * rank;
      const float* xr = x + r * ldx;
      float* zr = z.data() + static_cast<size_t>(r) * rank;
      lora_down(xr, a, in, rank, zr);
      for (int k = 0; k < rank; ++k) zr[k] *= adapters->scales[s];
    }
    if (any) {
      product.lora.z = z.data();
      product.lora.slot = slot.data();
      product.lora.b_panels = adapters->b_panels;
      product.lora.rank = rank;
      product.lora.n_panels = n_panels;
    }
  }
  Pool::get().run(product);
}

// x (rows, in) as a row-major block: a pointer to it and its row stride (gathered into `copy` if strided).
const float* rows_of(const float* xp, int rows, int in, long row_stride, long column_stride, std::vector<float>& copy,
                     long& ldx) {
  if (column_stride == 1 && (rows == 1 || row_stride >= in)) {
    ldx = rows == 1 ? in : row_stride;
    return xp;
  }
  copy.resize(static_cast<size_t>(rows) * in);
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < in; ++i) copy[static_cast<size_t>(r) * in + i] = xp[r * row_stride + i * column_stride];
  ldx = in;
  return copy.data();
}

class PanelMatmul : public mx::Primitive {
 public:
  PanelMatmul(mx::Stream stream, int out) : mx::Primitive(stream), out_(out) {}

  // inputs: x, panels[, a, b_panels, scales, slots]
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    const mx::array& panels = inputs[1];
    mx::array& y = outputs[0];
    y.set_data(mx::allocator::malloc(y.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& input : inputs) encoder.set_input_array(input);
    encoder.set_output_array(y);
    LoraInputs adapters;
    if (inputs.size() == 6) {
      for (size_t k = 2; k < 5; ++k)
        if (!inputs[k].flags().row_contiguous) throw std::invalid_argument("lora_panel_matmul: a, b_panels and scales must be contiguous");
      adapters.a = inputs[2].data<float>();
      adapters.b_panels = inputs[3].data<float>();
      adapters.scales = inputs[4].data<float>();
      adapters.slots = inputs[5].data<uint32_t>();
      adapters.slot_stride = inputs[5].strides()[0];  // 0 for mx.full's broadcast
      adapters.n_slots = inputs[2].shape(0);
      adapters.rank = inputs[2].shape(2);
    }
    int rows = x.shape(0), in = x.shape(1), n_panels = panels.shape(0);
    long row_stride = x.strides()[0], column_stride = x.strides()[1];
    encoder.dispatch([xp = x.data<float>(), pp = panels.data<float>(), yp = y.data<float>(), rows, in, out = out_,
                      n_panels, row_stride, column_stride, adapters, with_adapters = inputs.size() == 6]() {
      std::vector<float> copy;
      long ldx;
      const float* rows_x = rows_of(xp, rows, in, row_stride, column_stride, copy, ldx);
      panel_product(rows_x, ldx, pp, yp, rows, in, out, n_panels, with_adapters ? &adapters : nullptr);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("panel_matmul runs on the CPU only");
  }

  const char* name() const override { return "PanelMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return out_ == static_cast<const PanelMatmul&>(other).out_;
  }

 private:
  int out_;
};

void check_product(const mx::array& x, const mx::array& panels, int out) {
  if (x.ndim() != 2 || panels.ndim() != 3 || panels.shape(2) != PANEL || panels.shape(1) != x.shape(1))
    throw std::invalid_argument("panel_matmul: x must be (rows, in) and panels (n, in, " + std::to_string(PANEL) + ")");
  if (x.dtype() != mx::float32 || panels.dtype() != mx::float32)
    throw std::invalid_argument("panel_matmul: float32 only");
  if (out <= 0 || out > panels.shape(0) * PANEL || out <= (panels.shape(0) - 1) * PANEL)
    throw std::invalid_argument("panel_matmul: out does not match the number of panels");
}

mx::array panel_matmul(const mx::array& x, const mx::array& panels, int out) {
  check_product(x, panels, out);
  mx::Stream stream = mx::default_stream(mx::Device::cpu);
  return mx::array({x.shape(0), out}, mx::float32, std::make_shared<PanelMatmul>(stream, out), {x, panels});
}

mx::array lora_panel_matmul(const mx::array& x, const mx::array& panels, int out, const mx::array& a,
                            const mx::array& b_panels, const mx::array& scales, const mx::array& slots) {
  check_product(x, panels, out);
  int n_slots = a.ndim() == 3 ? a.shape(0) : -1, rank = a.ndim() == 3 ? a.shape(2) : -1;
  if (a.ndim() != 3 || a.shape(1) != x.shape(1) || b_panels.ndim() != 4 || b_panels.shape(0) != n_slots ||
      b_panels.shape(1) != panels.shape(0) || b_panels.shape(2) != rank || b_panels.shape(3) != PANEL ||
      scales.ndim() != 1 || scales.shape(0) != n_slots || slots.ndim() != 1 || slots.shape(0) != x.shape(0))
    throw std::invalid_argument("lora_panel_matmul: a must be (slots, in, rank), b_panels (slots, n, rank, " +
                                std::to_string(PANEL) + "), scales (slots,) and slots (rows,)");
  if (a.dtype() != mx::float32 || b_panels.dtype() != mx::float32 || scales.dtype() != mx::float32 ||
      slots.dtype() != mx::uint32)
    throw std::invalid_argument("lora_panel_matmul: a, b_panels and scales float32, slots uint32");
  mx::Stream stream = mx::default_stream(mx::Device::cpu);
  return mx::array({x.shape(0), out}, mx::float32, std::make_shared<PanelMatmul>(stream, out),
                   {x, panels, a, b_panels, scales, slots});
}

}  // namespace

NB_MODULE(_panel_matmul, m) {
  m.def("panel_matmul", &panel_matmul, "x"_a, "panels"_a, "out"_a,
        "y (rows, out) float32 = x (rows, in) @ W.T, W given as panels (ceil(out / PANEL), in, PANEL).");
  m.def("lora_panel_matmul", &lora_panel_matmul, "x"_a, "panels"_a, "out"_a, "a"_a, "b_panels"_a, "scales"_a, "slots"_a,
        "panel_matmul plus each row's adapter term: y[r] += scales[s] * (x[r] @ a[s]) @ B[s] with s = slots[r] "
        "(0, or a slot past a's: none); a (slots, in, rank), b_panels (slots, ceil(out / PANEL), rank, PANEL).");
  m.def("threads", [] { return Pool::get().threads(); }, "Threads that share each product (the caller's included).");
  m.attr("PANEL") = PANEL;
}
