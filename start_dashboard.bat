@echo off
rem Offload: double-click to start the dashboard (python launch.py).
setlocal
cd /d "%~dp0"
chcp 65001 >nul

where py >nul 2>nul
if %errorlevel%==0 (
    py -3 launch.py %*
    goto :done
)
where python >nul 2>nul
if %errorlevel%==0 (
    python launch.py %*
    goto :done
)
echo.
echo Python was not found on this computer.
echo Install Python 3.10 or newer from https://www.python.org/downloads/
echo and tick "Add python.exe to PATH" in the installer, then double-click this file again.
echo.
pause
exit /b 1

:done
if errorlevel 1 (
    echo.
    echo Offload stopped with an error. The messages above say what went wrong.
    echo If you need help, copy them, or see README.md.
    echo.
    pause
)
endlocal
