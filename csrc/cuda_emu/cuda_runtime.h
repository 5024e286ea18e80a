// Stand-in for the CUDA toolkit header of this name, for the CPU emulation (cuda_emu.h).
#pragma once
#include "cuda_emu.h"
