/*
 * bcryptprimitives.c - a stand-in bcryptprimitives.dll for running the Windows build under Wine.
 *
 * Why it exists: Rust's standard library (since 1.78) gets its random numbers from
 * ProcessPrng in bcryptprimitives.dll. Wine 8.0 (Debian 12) has no ProcessPrng, so any Rust
 * program for x86_64-pc-windows-gnu fails to start under it. Placed beside the .exe, this DLL
 * provides ProcessPrng on top of advapi32's RtlGenRandom (SystemFunction036), which Wine has.
 *
 * Only for running under Wine (the end-to-end tests in tests/tests/windows.rs). Real Windows
 * (8 and later) ships its own bcryptprimitives.dll: never install this file there.
 *
 * Build: x86_64-w64-mingw32-gcc -shared -o bcryptprimitives.dll \
 *            bcryptprimitives.c bcryptprimitives.def -ladvapi32
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buf, ULONG len); /* advapi32's RtlGenRandom */

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x7fffffffUL ? 0x7fffffffUL : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}

BOOL WINAPI DllMain(HINSTANCE h, DWORD r, LPVOID p)
{
    (void)h;
    (void)r;
    (void)p;
    return TRUE;
}
