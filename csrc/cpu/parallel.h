// SPDX-License-Identifier: Apache-2.0
// The one place that decides how CPU work is spread over threads: a fork-join over a fixed
// number of workers with std::thread. std::thread rather than OpenMP so that the extension never
// brings a second OpenMP runtime into a process where torch already loaded its own libgomp.
#pragma once

#include <thread>
#include <vector>

namespace diffrepro::detail {

// Runs fn(worker) for worker = 0..workers-1, worker 0 on the calling thread.
template <class Fn>
void parallel_for_workers(int workers, Fn&& fn) {
  if (workers <= 1) {
    fn(0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) pool.emplace_back([&fn, w] { fn(w); });
  fn(0);
  for (auto& t : pool) t.join();
}

// Contiguous share [begin, end) of `total` items for `worker` of `workers` (deterministic).
inline void worker_range(long long total, int worker, int workers, long long& begin,
                         long long& end) {
  begin = total * worker / workers;
  end = total * (worker + 1) / workers;
}

}  // namespace diffrepro::detail
