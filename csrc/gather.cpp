// fastloop._C: a background thread that gathers rows by index into output buffers.
//
// The extension only moves bytes: sources, outputs and indices arrive as raw data pointers
// (taken from contiguous CPU tensors on the Python side), so it needs no torch headers and
// builds under pip's build isolation in seconds, independent of the torch version.
//
// Each batch is a Job split into ~64 KiB chunks of rows. The worker thread works through the
// queue ahead of the consumer; a consumer waiting for a batch copies that batch's unclaimed
// chunks itself, so an idle consumer doubles the gather rate and never sleeps on a starved worker.
//
// Threading contract:
//   * the worker thread never touches the Python C API; it reads only the raw fields of a Job;
//   * Job::keep (references that keep the memory alive) is created and destroyed only on the
//     main thread with the GIL held;
//   * close() (and the destructor) joins the worker before any Job, and so any buffer, is freed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

std::atomic<int> g_live_workers{0};  // debug counter: worker threads not yet finished

// One source tensor of a job: copy rows idx[i] of src into row i of dst.
struct Copy {
  const char* src;
  char* dst;
  int64_t row_bytes;
  int64_t src_rows;
};

constexpr int64_t kChunkBytes = 64 * 1024;  // work unit that the two threads share
constexpr int64_t kNoError = INT64_MAX;

// One batch: rows idx[0, n) of every source. It is split into chunks of rows that the worker
// and the waiting consumer claim with an atomic counter, so both can copy the same batch.
struct Job {
  std::vector<Copy> copies;
  const int64_t* idx = nullptr;
  int64_t n = 0;
  int64_t chunk_rows = 1;
  int64_t n_chunks = 1;
  std::atomic<int64_t> next_chunk{0};
  std::atomic<int64_t> chunks_left{0};
  std::atomic<int64_t> bad_pos{kNoError};  // first out-of-range position (min over chunks)
  std::atomic<bool> done{false};           // all chunks finished; set under the mutex
  int active = 0;                          // threads inside work_on(); guarded by the mutex
  py::object keep;                         // main thread + GIL only

  void plan() {
    int64_t row_bytes = 0;
    for (const Copy& c : copies) row_bytes += c.row_bytes;
    chunk_rows = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, row_bytes));
    n_chunks = std::max<int64_t>(1, (n + chunk_rows - 1) / chunk_rows);
    chunks_left.store(n_chunks);
  }
};

// A shuffled gather reads rows scattered over the source: once the training step has evicted
// the source from the caches, rows are cache misses. Measured on the 2-core VM (1920 shuffled
// rows of 128 + 8 bytes): 47 us with the source cache-warm, ~290 us inside a compiled fit,
// ~190-210 us there when the row kPrefetchRows ahead is requested early (several misses in
// flight instead of one at a time).
constexpr int64_t kPrefetchRows = 16;
constexpr int64_t kPrefetchMaxBytes = 512;  // first cache lines only of very wide rows

inline void prefetch_row(const char* row, int64_t row_bytes) {
  const int64_t bytes = std::min(row_bytes, kPrefetchMaxBytes);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(row + offset, 0, 0);
}

// Rows [lo, hi): check every index first, then copy; runs of consecutive indices become one
// memcpy (the unshuffled case).
void copy_chunk(Job& job, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    for (const Copy& c : job.copies) {
      if (job.idx[i] < 0 || job.idx[i] >= c.src_rows) {
        int64_t seen = job.bad_pos.load();
        while (i < seen && !job.bad_pos.compare_exchange_weak(seen, i)) {
        }
        return;
      }
    }
  }
  for (const Copy& c : job.copies) {
    for (int64_t i = lo; i < hi;) {
      if (i + kPrefetchRows < hi) prefetch_row(c.src + job.idx[i + kPrefetchRows] * c.row_bytes, c.row_bytes);
      int64_t run = 1;
      while (i + run < hi && job.idx[i + run] == job.idx[i] + run) ++run;
      std::memcpy(c.dst + i * c.row_bytes, c.src + job.idx[i] * c.row_bytes,
                  static_cast<size_t>(run * c.row_bytes));
      i += run;
    }
  }
}

// Copies chunks until none is left to claim; true if this call finished the last chunk.
bool work_on(Job& job) {
  bool finished = false;
  for (;;) {
    const int64_t k = job.next_chunk.fetch_add(1);
    if (k >= job.n_chunks) return finished;
    copy_chunk(job, k * job.chunk_rows, std::min(job.n, (k + 1) * job.chunk_rows));
    if (job.chunks_left.fetch_sub(1) == 1) finished = true;
  }
}

void raise_job_error(const Job& job) {
  const int64_t pos = job.bad_pos.load();
  if (pos == kNoError) return;
  const int64_t r = job.idx[pos];  // still alive: job.keep holds the index tensor
  int64_t rows = 0;
  for (const Copy& c : job.copies) {
    if (r < 0 || r >= c.src_rows) {
      rows = c.src_rows;
      break;
    }
  }
  throw py::index_error("index " + std::to_string(r) + " at batch position " +
                        std::to_string(pos) + " is out of range for a source with " +
                        std::to_string(rows) + " rows");
}

std::vector<Copy> parse_copies(const std::vector<std::tuple<uintptr_t, uintptr_t, int64_t, int64_t>>& in) {
  std::vector<Copy> out;
  out.reserve(in.size());
  for (const auto& [src, dst, row_bytes, src_rows] : in) {
    if (row_bytes < 0 || src_rows < 0) throw py::value_error("row_bytes and src_rows must be >= 0");
    if (src == 0 || dst == 0) throw py::value_error("null data pointer");
    out.push_back(Copy{reinterpret_cast<const char*>(src), reinterpret_cast<char*>(dst), row_bytes, src_rows});
  }
  return out;
}

// A FIFO of gather jobs served by one worker thread. At most `depth` jobs may be outstanding
// (submitted and not yet collected with wait()).
class Gatherer {
 public:
  explicit Gatherer(int64_t depth) : depth_(depth), owner_pid_(getpid()) {
    if (depth < 1) throw py::value_error("depth must be >= 1, got " + std::to_string(depth));
    g_live_workers.fetch_add(1);  // before the thread starts, so the count never dips below
    try {
      thread_ = std::make_unique<std::thread>([this] { loop(); });
    } catch (...) {
      g_live_workers.fetch_sub(1);
      throw;
    }
  }

  ~Gatherer() { shutdown(); }  // GIL held; the worker never needs it, so joining is safe

  void submit(const std::vector<std::tuple<uintptr_t, uintptr_t, int64_t, int64_t>>& copies,
              uintptr_t idx_ptr, int64_t n, py::object keep) {
    if (closed_) throw std::runtime_error("Gatherer is closed");
    if (n < 0) throw py::value_error("n must be >= 0");
    if (n > 0 && idx_ptr == 0) throw py::value_error("null index pointer");
    auto job = std::make_unique<Job>();
    job->copies = parse_copies(copies);
    job->idx = reinterpret_cast<const int64_t*>(idx_ptr);
    job->n = n;
    job->plan();
    job->keep = std::move(keep);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (static_cast<int64_t>(jobs_.size()) >= depth_)
        throw std::runtime_error("queue is full (" + std::to_string(depth_) + " jobs outstanding)");
      jobs_.push_back(std::move(job));
    }
    cv_.notify_all();
  }

  // Finishes the oldest job (GIL released), then re-raises its error if any.
  //
  // The caller copies the job's unclaimed chunks itself instead of sleeping: with an idle
  // consumer both threads gather, and a CPU-starved worker cannot stall the consumer. It then
  // spins briefly on the worker's last chunk before blocking on the condition variable.
  void wait() {
    std::unique_ptr<Job> job;
    {
      py::gil_scoped_release release;
      std::unique_lock<std::mutex> lock(mu_);
      if (jobs_.empty()) throw std::runtime_error("no job to wait for");
      Job* front = jobs_.front().get();
      ++front->active;
      lock.unlock();
      const bool finished = work_on(*front);
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      while (!finished && !front->done.load(std::memory_order_acquire) &&
             std::chrono::steady_clock::now() < until) {
        std::this_thread::yield();
      }
      lock.lock();
      --front->active;
      if (finished) front->done.store(true, std::memory_order_release);
      // The worker may still be inside work_on() (about to see no chunk left): wait it out.
      cv_.wait(lock, [&] { return front->done.load() && front->active == 0; });
      job = std::move(jobs_.front());
      jobs_.pop_front();
      if (next_ > 0) --next_;  // else the worker never reached this job
    }
    raise_job_error(*job);  // `job` (and its py::object) dies here, with the GIL held
  }

  int64_t pending() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(jobs_.size());
  }

  void close() {
    {
      py::gil_scoped_release release;
      stop_and_join();
    }
    jobs_.clear();  // GIL held again: drops the keep-alive references
  }

 private:
  void loop() {
    for (;;) {
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || next_ < jobs_.size(); });
        if (stop_) break;
        job = jobs_[next_++].get();  // heap object: stays put while the deque changes
        ++job->active;
      }
      const bool finished = work_on(*job);
      {
        std::lock_guard<std::mutex> lock(mu_);
        --job->active;
        if (finished) job->done.store(true, std::memory_order_release);
      }
      cv_.notify_all();
    }
    g_live_workers.fetch_sub(1);
  }

  void stop_and_join() {
    if (closed_) return;
    closed_ = true;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (getpid() != owner_pid_) {
      // After fork() the worker does not exist in this process: leak the handle instead of
      // joining a thread that is not there (std::thread's destructor would terminate).
      thread_.release();
      return;
    }
    if (thread_ && thread_->joinable()) thread_->join();
  }

  void shutdown() {
    stop_and_join();
    jobs_.clear();
  }

  const int64_t depth_;
  const pid_t owner_pid_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Job>> jobs_;  // outstanding jobs, oldest first
  size_t next_ = 0;  // jobs_[0, next_) have been reached by the worker
  bool stop_ = false;
  bool closed_ = false;
  std::unique_ptr<std::thread> thread_;
};

// Synchronous gather on the calling thread, GIL released (for tests and benchmarks).
void gather(const std::vector<std::tuple<uintptr_t, uintptr_t, int64_t, int64_t>>& copies,
            uintptr_t idx_ptr, int64_t n) {
  if (n < 0) throw py::value_error("n must be >= 0");
  Job job;
  job.copies = parse_copies(copies);
  job.idx = reinterpret_cast<const int64_t*>(idx_ptr);
  job.n = n;
  job.plan();
  {
    py::gil_scoped_release release;
    work_on(job);
  }
  raise_job_error(job);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastloop's native row gatherer (raw pointers in, memcpy per row, no GIL).";
  m.attr("ABI_VERSION") = 1;  // bump when the Python-facing signatures change (see _ext.py)
  py::class_<Gatherer>(m, "Gatherer")
      .def(py::init<int64_t>(), py::arg("depth"))
      .def("submit", &Gatherer::submit, py::arg("copies"), py::arg("idx_ptr"), py::arg("n"),
           py::arg("keep") = py::none(),
           "Queue a job. copies: [(src_ptr, dst_ptr, row_bytes, src_rows)], idx: int64[n].")
      .def("wait", &Gatherer::wait, "Wait for the oldest job; re-raise its error.")
      .def("pending", &Gatherer::pending)
      .def("close", &Gatherer::close, "Stop and join the worker thread (idempotent).");
  m.def("gather", &gather, py::arg("copies"), py::arg("idx_ptr"), py::arg("n"));
  m.def("live_workers", [] { return g_live_workers.load(); },
        "Number of worker threads still running (debug counter).");
}
