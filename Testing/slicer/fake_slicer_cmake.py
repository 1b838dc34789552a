"""Just enough of Slicer's CMake interface to configure, build and install the extension without Slicer.

The macros copy the module files into the build tree and install them as Slicer's do (flat qt-scripted-modules
layout); ``slicer_add_python_unittest`` checks that the registered script exists and records it.
"""

import shutil
import subprocess
import textwrap
from pathlib import Path

from nnsam_slicer_helpers import REPOSITORY

SCRIPTED_MODULES = Path("lib") / "Slicer-5.10" / "qt-scripted-modules"

SLICER_CONFIG = textwrap.dedent("""
    set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
    set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
    set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
    set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
    set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
""")
USE_SLICER = textwrap.dedent("""
    macro(slicerMacroBuildScriptedModule)
      cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
      if(MY_UNPARSED_ARGUMENTS)
        message(FATAL_ERROR "unknown arguments ${MY_UNPARSED_ARGUMENTS}")
      endif()
      foreach(file ${MY_SCRIPTS} ${MY_RESOURCES})
        if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
          message(FATAL_ERROR "missing ${file}")
        endif()
        configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${file}
                       ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${file} COPYONLY)
        get_filename_component(dir ${file} DIRECTORY)
        install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/${file}
                DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${dir} COMPONENT RuntimeLibraries)
      endforeach()
    endmacro()
    macro(slicer_add_python_unittest)
      cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
      if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT})
        message(FATAL_ERROR "missing test script ${MY_SCRIPT}")
      endif()
      file(APPEND ${CMAKE_BINARY_DIR}/python-unittests.txt "${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT}\\n")
    endmacro()
""")


def configure(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Configure the extension into ``tmp_path/build``; returns cmake's result."""
    fake = tmp_path / "FakeSlicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(SLICER_CONFIG)
    (fake / "UseSlicer.cmake").write_text(USE_SLICER)
    (fake / "Empty.cmake").write_text("")
    return subprocess.run(
        ["cmake", "-S", str(REPOSITORY), "-B", str(tmp_path / "build"), f"-DSlicer_DIR={fake}", "-DBUILD_TESTING=ON",
         "-DCMAKE_C_COMPILER_WORKS=1", "-DCMAKE_CXX_COMPILER_WORKS=1", *extra],
        capture_output=True, text=True, timeout=120)


def cmakeAvailable() -> bool:
    return shutil.which("cmake") is not None
