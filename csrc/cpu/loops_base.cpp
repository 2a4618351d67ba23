// The CPU loops for the baseline instruction set of the build (SSE2 on x86-64).
#include "loops.h"

FA_DEFINE_CPU_LOOPS(kLoopsBaseline, "baseline")
