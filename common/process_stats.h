// What a measurement reports about the process itself (resident memory, page faults) and the
// median it summarizes repeated runs with; `kiln bench` prints them.
#pragma once

#include <vector>

namespace kiln {

// The median of `values` (the mean of the middle two for an even count); 0 for none.
double median(std::vector<double> values);

// The largest resident set so far, in MiB (getrusage's ru_maxrss).
double peak_rss_mib();

// The resident set now (not the peak), in MiB; 0 where /proc/self/statm cannot be read.
double current_rss_mib();

// Major page faults (those that read from disk) of the process so far.
long long major_page_faults();

}  // namespace kiln
