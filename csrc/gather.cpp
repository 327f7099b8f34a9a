// fastloop._C: a background thread that gathers rows by index into output buffers.
//
// The extension only moves bytes: sources, outputs and indices arrive as raw data pointers
// (taken from contiguous CPU tensors on the Python side), so it needs no torch headers and
// builds under pip's build isolation in seconds, independent of the torch version.
//
// Threading contract:
//   * the worker thread never touches the Python C API; it reads only the raw fields of a Job;
//   * Job::keep (references that keep the memory alive) is created and destroyed only on the
//     main thread with the GIL held;
//   * close() (and the destructor) joins the worker before any Job, and so any buffer, is freed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <chrono>
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

enum class ErrKind { kNone, kIndex, kValue, kRuntime };

struct Job {
  std::vector<Copy> copies;
  const int64_t* idx = nullptr;
  int64_t n = 0;
  std::atomic<bool> done{false};  // written under the mutex, read without it while spinning
  ErrKind err = ErrKind::kNone;
  std::string msg;
  py::object keep;  // main thread + GIL only
};

// Copies one job; consecutive indices are merged into one memcpy (the unshuffled case).
void run_job(Job& job) {
  for (int64_t i = 0; i < job.n; ++i) {
    const int64_t r = job.idx[i];
    for (const Copy& c : job.copies) {
      if (r < 0 || r >= c.src_rows) {
        job.err = ErrKind::kIndex;
        job.msg = "index " + std::to_string(r) + " at batch position " + std::to_string(i) +
                  " is out of range for a source with " + std::to_string(c.src_rows) + " rows";
        return;
      }
    }
  }
  for (const Copy& c : job.copies) {
    int64_t i = 0;
    while (i < job.n) {
      int64_t run = 1;
      while (i + run < job.n && job.idx[i + run] == job.idx[i] + run) ++run;
      std::memcpy(c.dst + i * c.row_bytes, c.src + job.idx[i] * c.row_bytes,
                  static_cast<size_t>(run * c.row_bytes));
      i += run;
    }
  }
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

void raise_job_error(const Job& job) {
  switch (job.err) {
    case ErrKind::kNone: return;
    case ErrKind::kIndex: throw py::index_error(job.msg);
    case ErrKind::kValue: throw py::value_error(job.msg);
    case ErrKind::kRuntime: throw std::runtime_error(job.msg);
  }
}

void run_job_safely(Job& job) {
  try {
    run_job(job);
  } catch (const std::exception& e) {
    job.err = ErrKind::kRuntime;
    job.msg = e.what();
  }
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
  // If the worker has not started that job yet (it is starved of CPU, or the consumer is
  // faster than one thread can gather), the caller runs it itself rather than sleeping until
  // the worker is scheduled. Otherwise it spins briefly (the job is usually microseconds from
  // done) before blocking on the condition variable.
  void wait() {
    std::unique_ptr<Job> job;
    {
      py::gil_scoped_release release;
      std::unique_lock<std::mutex> lock(mu_);
      if (jobs_.empty()) throw std::runtime_error("no job to wait for");
      Job* front = jobs_.front().get();
      if (next_ == 0) {  // unclaimed: run it here
        next_ = 1;
        lock.unlock();
        run_job_safely(*front);
        lock.lock();
        front->done.store(true, std::memory_order_release);
      } else if (!front->done.load(std::memory_order_acquire)) {
        lock.unlock();
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
        while (!front->done.load(std::memory_order_acquire) &&
               std::chrono::steady_clock::now() < until) {
          std::this_thread::yield();
        }
        lock.lock();
        cv_.wait(lock, [&] { return front->done.load() || stop_; });
      }
      if (!front->done.load()) throw std::runtime_error("Gatherer was closed while waiting");
      job = std::move(jobs_.front());
      jobs_.pop_front();
      --next_;
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
        job = jobs_[next_++].get();  // claim it; heap object: stays put while the deque changes
      }
      run_job_safely(*job);
      {
        std::lock_guard<std::mutex> lock(mu_);
        job->done.store(true, std::memory_order_release);
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
  size_t next_ = 0;  // jobs_[0, next_) are claimed (running or done); the rest are queued
  bool stop_ = false;
  bool closed_ = false;
  std::unique_ptr<std::thread> thread_;
};

// Synchronous gather on the calling thread, GIL released (for tests and benchmarks).
void gather(const std::vector<std::tuple<uintptr_t, uintptr_t, int64_t, int64_t>>& copies,
            uintptr_t idx_ptr, int64_t n) {
  Job job;
  job.copies = parse_copies(copies);
  job.idx = reinterpret_cast<const int64_t*>(idx_ptr);
  job.n = n;
  {
    py::gil_scoped_release release;
    run_job(job);
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
